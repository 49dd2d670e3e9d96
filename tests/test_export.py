"""Export: the merged `transformers` model and the PEFT adapter give the logits of the fedlora model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.numpy import save_file

from common.adapters import ADAPTERS
from common.config import RunConfig
from common.export import adapted_with
from common.payload import trainable_state
from tests.conftest import REPO

LABELS = ["animal", "food", "tool"]
TEXTS = ["a small furry creature that purrs", "a sweet dish eaten after dinner", "a metal device used to cut wood"]


def finished_run(tmp_path, adapter: str):
    """A run directory as the ServerApp leaves it, with a randomly 'trained' adapter and head."""
    config = RunConfig(adapter=adapter, rank=4, strategy="fedavg_lora", run_dir=str(tmp_path))
    adapted = adapted_with(config, {}, LABELS)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in adapted.model.named_parameters():
            if p.requires_grad:  # a head with O(1) logits and an adapter update of realistic size
                p.add_(torch.randn(p.shape, generator=generator) * (0.5 if name.startswith("classifier.") else 0.05))
    save_file(trainable_state(adapted.model), str(tmp_path / "adapter.safetensors"))
    (tmp_path / "run_config.json").write_text(json.dumps(config.to_flower()))
    (tmp_path / "labels.json").write_text(json.dumps(LABELS))
    return adapted


def logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**batch).logits


# Block-LoRA, WaRA, SLTrain, DiffoRA and SoRA merge through the base class's fold of ΔW, Transformed LoRA through
# RemembersMergedDelta as Bat does (all checked in tests/test_adapters.py), and have no PEFT form: a full
# export each (about 12 s) would test nothing new. SMoRA cannot merge: its refusal is checked in
# tests/test_adapters_structured.py. CoDyRA merges as SoRA does; ALLoRA is LoRA at alpha = rank, and its
# PEFT export (with per-layer ranks) is checked in tests/test_rank_growth.py. SaRA folds ΔW as SLTrain does, on a
# support the export rebuilds from W0 (its full export passed once when it was added).
MERGE_CHECKED_BY_THE_ADAPTER_TABLE = {"block_lora", "wara", "sltrain", "transformed_lora", "diffora", "smora",
                                      "sora", "codyra", "allora", "sara"}


@pytest.mark.parametrize("adapter", sorted(set(ADAPTERS) - MERGE_CHECKED_BY_THE_ADAPTER_TABLE))
def test_merged_export_loads_with_plain_transformers_and_gives_the_same_logits(tmp_path, adapter):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    adapted = finished_run(tmp_path, adapter)
    expected = logits(adapted.model, adapted.tokenizer)
    head_only = {k: v for k, v in trainable_state(adapted.model).items() if k.startswith("classifier.")}
    untouched = adapted_with(RunConfig(adapter=adapter, rank=4), head_only, LABELS)
    assert (logits(untouched.model, untouched.tokenizer) - expected).abs().max() > 1e-3, "the adapter must matter"
    from server.export import main as export  # in process: the command line itself is tested below

    export([str(tmp_path)] + (["--peft"] if ADAPTERS[adapter].peft_config else []))
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert merged.config.id2label == dict(enumerate(LABELS))
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, AutoTokenizer.from_pretrained(tmp_path / "merged")), expected,
                               atol=2e-5, rtol=1e-4)  # 50x below the adapter's own effect
    if ADAPTERS[adapter].peft_config:
        from peft import PeftModel

        from common.model import resolve_model_path

        base = AutoModelForSequenceClassification.from_pretrained(resolve_model_path(""), num_labels=len(LABELS))
        peft_model = PeftModel.from_pretrained(base, tmp_path / "peft")
        torch.testing.assert_close(logits(peft_model, adapted.tokenizer), expected, atol=1e-5, rtol=1e-5)


def test_export_of_a_directory_that_is_not_a_run_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "server.export", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "lacks run_config.json, adapter.safetensors, labels.json" in result.stderr


def test_randlora_peft_export_slices_shared_bases_across_layer_shapes(tmp_path):
    """Layers of three shapes (384x384, 1536x384, 384x1536: γ on the input and on the output side) share
    PEFT's one pair of bases sized for the largest; PEFT must load ours and give our logits."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from common.adapters.randlora import random_bases, unique_basis
    from common.export import export_peft
    from common.model import resolve_model_path

    config = RunConfig(adapter="randlora", rank=64, alpha=32.0, target_modules="dense", seed=7)
    adapted = adapted_with(config, {}, LABELS)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in adapted.model.named_parameters():
            if p.requires_grad:  # trained λ and γ (both far from their init) and head
                p.add_(torch.randn(p.shape, generator=generator) * (0.5 if name.startswith("classifier.") else 0.02))
    expected = logits(adapted.model, adapted.tokenizer)
    export_peft(config, adapted, tmp_path / "peft")
    saved = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    a = next(v for k, v in saved.items() if k.endswith("randlora_A"))
    b = next(v for k, v in saved.items() if k.endswith("randlora_B"))
    assert a.shape == (64, 1, 1536) and b.shape == (1536, 24, 64)  # PEFT's shared pair, largest shape
    torch.testing.assert_close(a[:, 0], unique_basis(7, 64, 1536), atol=0, rtol=0)
    torch.testing.assert_close(b, random_bases(7, 64, 1536, 24), atol=0, rtol=0)
    base = AutoModelForSequenceClassification.from_pretrained(resolve_model_path(""), num_labels=len(LABELS))
    peft_model = PeftModel.from_pretrained(base, tmp_path / "peft")
    torch.testing.assert_close(logits(peft_model, adapted.tokenizer), expected, atol=1e-5, rtol=1e-5)


def test_peft_export_of_an_adapter_peft_lacks_is_one_line(tmp_path):
    finished_run(tmp_path, "svfit")
    result = subprocess.run([sys.executable, "-m", "server.export", str(tmp_path), "--peft"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "adapter 'svfit' has no PEFT equivalent (PEFT export: allora, bat, bone, dora, lora, randlora)" in result.stderr


def test_a_global_lora_of_another_rank_than_the_runs_exports_with_the_runs_scale(tmp_path):
    """FLoRA's stacked global has rank Σ r_k, not `rank`; fedlora scales it by alpha / rank (r_max) and so
    must the PEFT adapter (lora_alpha / r)."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from common.export import export_peft
    from common.model import resolve_model_path

    config = RunConfig(adapter="lora", rank=4, alpha=16.0, strategy="flora")
    generator = torch.Generator().manual_seed(1)
    template = adapted_with(config, {}, LABELS)
    arrays = {}
    for name, p in template.model.named_parameters():
        if p.requires_grad:
            shape = (6, p.shape[1]) if name.endswith("lora_A.weight") else (
                (p.shape[0], 6) if name.endswith("lora_B.weight") else tuple(p.shape))
            arrays[name] = (torch.randn(shape, generator=generator) * 0.05).numpy()
    adapted = adapted_with(config, arrays, LABELS)
    layer = adapted.model.bert.encoder.layer[0].attention.self.query
    assert layer.lora_A.weight.shape[0] == 6 and layer.scaling == 16.0 / 4
    expected = logits(adapted.model, adapted.tokenizer)
    export_peft(config, adapted, tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["r"] == 6
    base = AutoModelForSequenceClassification.from_pretrained(resolve_model_path(""), num_labels=len(LABELS))
    peft_model = PeftModel.from_pretrained(base, tmp_path / "peft")
    torch.testing.assert_close(logits(peft_model, adapted.tokenizer), expected, atol=1e-5, rtol=1e-5)


def test_a_dylora_run_exports_at_a_truncated_rank_as_the_model_its_schedule_trained_at_that_rank(tmp_path):
    """`python -m server.export RUN --rank 2` on a rank-4 DyLoRA run: the merged model's logits are those of the
    fedlora model with ranks above 2 masked and scale alpha/2 (DyLoRA's forward at b = 2); non-DyLoRA runs and
    ranks outside 1..rank are one-line errors."""
    from transformers import AutoModelForSequenceClassification

    from common.adapters.lora import LoRALinear
    from common.errors import ConfigError
    from common.training.dylora import prefix_mask
    from server.export import at_rank, main

    config = RunConfig(rank=4, rank_schedule="dylora", strategy="fedavg_lora", run_dir=str(tmp_path))
    adapted = finished_run(tmp_path, "lora")
    (tmp_path / "run_config.json").write_text(json.dumps(config.to_flower()))
    for layer in adapted.model.modules():
        if isinstance(layer, LoRALinear):
            layer.rank_mask, layer.scaling = prefix_mask(4, 2, layer.lora_A.weight), config.alpha / 2
    expected = logits(adapted.model, adapted.tokenizer)
    main([str(tmp_path), "--rank", "2"])
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged-rank-2")
    torch.testing.assert_close(logits(exported, adapted.tokenizer), expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ConfigError, match=r"--rank 5 is outside 1..4"):
        at_rank(config, {}, 5)
    with pytest.raises(ConfigError, match="its ranks are not nested"):
        at_rank(RunConfig(rank=4), {}, 2)

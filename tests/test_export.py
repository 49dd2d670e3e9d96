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


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_merged_export_loads_with_plain_transformers_and_gives_the_same_logits(tmp_path, adapter):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    adapted = finished_run(tmp_path, adapter)
    expected = logits(adapted.model, adapted.tokenizer)
    head_only = {k: v for k, v in trainable_state(adapted.model).items() if k.startswith("classifier.")}
    untouched = adapted_with(RunConfig(adapter=adapter, rank=4), head_only, LABELS)
    assert (logits(untouched.model, untouched.tokenizer) - expected).abs().max() > 1e-3, "the adapter must matter"
    args = [str(tmp_path)] + (["--peft"] if ADAPTERS[adapter].peft_config else [])
    result = subprocess.run([sys.executable, "-m", "server.export", *args], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
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

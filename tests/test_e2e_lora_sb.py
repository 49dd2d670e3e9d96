"""End to end: LoRA-SB with its private init in a real `flwr run` simulation (2 clients, 2 rounds)."""

from __future__ import annotations

import json

import numpy as np

from tests.conftest import needs_wordnet, run_demo_ok
from tests.test_e2e_simulation import TINY


@needs_wordnet
def test_private_init_is_charged_as_round_0_and_its_bases_are_broadcast(tmp_path):
    from safetensors.numpy import load_file

    settings = TINY.replace('strategy="fedsvd"', 'strategy="fedavg_lora"')
    run_demo_ok(2, settings, f'adapter="lora_sb" init-data="private" run-dir="{tmp_path}"')
    report = json.loads((tmp_path / "privacy.json").read_text())
    for client in report["clients"]:
        assert [(row["round"], row["steps"]) for row in client["history"]] == [(0, 1), (1, 5), (2, 5)]
        assert 49.0 < client["epsilon"] <= 50.0  # the calibration counted the init step
    rounds = json.loads((tmp_path / "metrics.json").read_text())["rounds"]
    assert [r["clients-trained"] for r in rounds[1:]] == [2, 2]  # replies without the bases are complete
    tensors = load_file(str(tmp_path / "adapter.safetensors"))
    bases = [v for k, v in tensors.items() if k.endswith("frozen_B.weight")]
    assert len(bases) == 12  # 6 layers x (query, value) of MiniLM-L6
    for b in bases:
        np.testing.assert_allclose(b.T @ b, np.eye(b.shape[1]), atol=1e-5)

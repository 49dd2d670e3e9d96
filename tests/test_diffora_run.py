"""DiffoRA in a run: kept-module names checked against the model, the selection run before round 1 by the
launchers, and the ServerApp's refusal of a DiffoRA run whose modules were never chosen."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
from torch import nn

from common.adapters import inject_adapters
from common.config import RunConfig
from common.errors import ConfigError

FAKE_LOGITS = {"blocks.0.query": 0.3, "blocks.1.query": -0.2, "blocks.2.query": 0.7, "blocks.3.query": 0.1}


def toy(modules: str) -> nn.Module:
    model = nn.Module()
    model.blocks = nn.ModuleList(nn.Module() for _ in range(2))
    for block in model.blocks:
        block.query, block.key = nn.Linear(6, 6), nn.Linear(6, 6)
    model.requires_grad_(False)
    inject_adapters(model, RunConfig(adapter="diffora", rank=2, target_modules="query", diffora_modules=modules))
    return model


@pytest.mark.parametrize("bad", ["blocks.0.qurey", "query", "blocks.0.key", "blocks.1.query,blocks.7.query"])
def test_a_kept_module_that_is_not_a_target_module_is_a_one_line_error_listing_the_candidates(bad):
    with pytest.raises(ConfigError) as caught:
        toy(bad)
    message = str(caught.value)
    wrong = sorted({m.strip() for m in bad.split(",")} - {"blocks.0.query", "blocks.1.query"})
    assert message.startswith(f"diffora-modules names {', '.join(wrong)}, not a target module of this model")
    assert message.endswith("give full dotted names from: blocks.0.query, blocks.1.query") and "\n" not in message


def test_valid_kept_modules_and_the_empty_selection_still_build():
    toy("blocks.1.query")
    toy("")  # every candidate: the search's starting point


def test_the_server_refuses_a_diffora_run_whose_modules_were_not_chosen(tmp_path):
    from common.diffora_selection import require_selection
    from server.server_app import run

    run_dir = tmp_path / "run"
    context = SimpleNamespace(run_config={"adapter": "diffora", "strategy": "fedavg_lora", "run-dir": str(run_dir)})
    with pytest.raises(ConfigError, match=r"diffora-modules = \"\": run `python -m common\.diffora_selection "
                                          r"--run-config \"\.\.\.\"` with this run's settings"):
        run(grid=None, context=context)
    assert not run_dir.exists(), "refused before anything is written"
    require_selection(RunConfig(adapter="diffora", diffora_modules="blocks.0.query"))
    require_selection(RunConfig(adapter="lora"))


@pytest.fixture
def fake_search(monkeypatch):
    calls = []

    def logits(config, steps):
        calls.append((config, steps))
        return dict(FAKE_LOGITS)

    monkeypatch.setattr("common.diffora_selection.public_split_logits", logits)
    return calls


def test_the_launchers_selection_goes_into_the_run_config_overrides(fake_search):
    from common.diffora_selection import resolve_diffora_modules

    lines = []
    config, overrides = resolve_diffora_modules(RunConfig(adapter="diffora", diffora_keep=0.5), {"num-rounds": 2},
                                                log=lines.append)
    assert overrides == {"num-rounds": 2, "diffora-modules": "blocks.0.query,blocks.2.query"}
    assert config.diffora_modules == "blocks.0.query,blocks.2.query" and len(fake_search) == 1
    assert lines[0].startswith("fedlora: DiffoRA: selecting the kept modules on the server's public split (128 "
                               "examples, 20 search steps, no privacy cost)")
    assert lines[1].startswith("fedlora: DiffoRA keeps 2 of 4 target modules (diffora-keep = 0.5) in ")
    assert lines[1].endswith('s: diffora-modules="blocks.0.query,blocks.2.query"')

    lora = RunConfig(adapter="lora")
    assert resolve_diffora_modules(lora, {"a": 1}, log=lines.append) == (lora, {"a": 1}) and len(fake_search) == 1


def test_explicit_kept_modules_are_checked_on_the_model_not_searched(fake_search, monkeypatch):
    from common.diffora_selection import resolve_diffora_modules

    built = []
    monkeypatch.setattr("common.data.partition.global_test_set", lambda config: SimpleNamespace(label_names="abc"))
    monkeypatch.setattr("common.model.build_model", lambda config, num_labels: built.append((config, num_labels)))
    config = RunConfig(adapter="diffora", diffora_modules="blocks.0.query")
    assert resolve_diffora_modules(config, {}, log=print) == (config, {})
    assert built == [(config, 3)] and fake_search == []


def test_the_demo_runs_the_selection_before_flwr_run_and_passes_it_to_every_party(fake_search, monkeypatch, tmp_path):
    import simulations.demo as demo

    started = []
    monkeypatch.setattr(demo, "validate", lambda config, num_clients: None)
    monkeypatch.setattr(demo, "simulation_superlink", contextlib.nullcontext)
    monkeypatch.setattr(demo, "flwr_run", lambda env, overrides, **kw: started.append(overrides) or 1)
    code = demo.main(["--run-config", f'adapter="diffora" strategy="fedavg_lora" diffora-keep=0.25 '
                                      f'run-dir="{tmp_path}"'])
    assert code == 1 and len(started) == 1  # the fake flwr run "failed": no summary to print
    assert started[0]["diffora-modules"] == "blocks.2.query" and started[0]["adapter"] == "diffora"
    assert fake_search[0][0].diffora_keep == 0.25


def test_the_selection_command_prints_the_setting_to_pass(fake_search, capsys):
    from common.diffora_selection import main

    assert main(["--run-config", "diffora-keep=0.75 rank=4", "--steps", "5"]) == 0
    out, err = capsys.readouterr()
    assert out == 'diffora-modules="blocks.0.query,blocks.2.query,blocks.3.query"\n'
    assert "DiffoRA keeps 3 of 4 target modules" in err and "pass it to flwr run" in err
    config, steps = fake_search[0]
    assert (config.adapter, config.rank, steps) == ("diffora", 4, 5)
    with pytest.raises(SystemExit) as stopped:
        main(["--run-config", 'adapter="lora"'])
    assert stopped.value.code == 2 and "use adapter=\"diffora\"" in capsys.readouterr().err


@pytest.mark.slow
def test_the_selection_command_on_the_real_model_gives_names_the_run_accepts(capsys):
    """About 30 s: the command's output is a valid diffora-modules for the default model."""
    from common.diffora_selection import main
    from common.model import build_model

    overrides = "rank=4 public-examples=16 batch-size=8 max-seq-len=16 diffora-keep=0.25"
    assert main(["--run-config", overrides, "--steps", "3"]) == 0
    line = capsys.readouterr().out.strip()
    modules = line.removeprefix('diffora-modules="').removesuffix('"')
    assert len(modules.split(",")) == 3
    config = RunConfig(adapter="diffora", rank=4, diffora_modules=modules, max_seq_len=16)
    assert sum("lora_A" in name for name in build_model(config, num_labels=3).trainable) == 3

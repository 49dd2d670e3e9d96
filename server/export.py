"""Export a finished run's global adapter as a model other tools load.

    python -m server.export RUN_DIR [--out DIR] [--peft] [--rank B]

Writes DIR (default RUN_DIR/merged) with the adapter merged into the base weights: a plain
`transformers` model plus tokenizer, loadable with `AutoModelForSequenceClassification.from_pretrained`.
With `--peft` it also writes RUN_DIR/peft, a PEFT adapter for `PeftModel.from_pretrained`
(adapters lora, dora, randlora, bone, bat: those PEFT has). SMoRA has no single ΔW to merge (its router
gates each token): its export stops with a one-line error. `--rank B` (runs with `rank-schedule = "dylora"`)
exports the nested adapter cut to its first B ranks at scale alpha/B, the model DyLoRA trained at rank B.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common.config import RunConfig, finished_run_config
from common.errors import ConfigError, exit_on_user_error
from common.export import adapted_with, export_merged, export_peft
from server.bases import load_start


def load_run(run_dir: Path) -> tuple[RunConfig, dict, list[str]]:
    """The run config, the final global arrays and the label names a finished run left behind."""
    from safetensors.numpy import load_file

    config = finished_run_config(run_dir, "adapter.safetensors", "labels.json")
    return config, load_file(str(run_dir / "adapter.safetensors")), json.loads((run_dir / "labels.json").read_text())


def at_rank(config: RunConfig, arrays: dict, b: int) -> tuple[RunConfig, dict]:
    """A DyLoRA run's config and arrays cut to rank b (`common/training/dylora.py`'s `truncated`)."""
    import dataclasses

    from common.training.dylora import truncated

    if config.rank_schedule != "dylora":
        raise ConfigError(f"--rank {b} cuts a DyLoRA adapter to a prefix of its ranks, and this run trained with "
                          f"rank-schedule = {config.rank_schedule!r}: its ranks are not nested (export it whole)")
    if not 1 <= b <= config.rank:
        raise ConfigError(f"--rank {b} is outside 1..{config.rank} (the run's rank)")
    return dataclasses.replace(config, rank=b, client_ranks=""), truncated(arrays, b)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="the run directory printed at the end of a run")
    parser.add_argument("--out", type=Path, help="where to write the merged model (default RUN_DIR/merged)")
    parser.add_argument("--peft", action="store_true",
                        help="also write RUN_DIR/peft (adapters lora, dora, randlora, bone, bat)")
    parser.add_argument("--rank", type=int, help="DyLoRA runs: export the first B ranks (scale alpha/B)")
    args = parser.parse_args(argv)
    config, arrays, labels = load_run(args.run_dir)
    if args.rank is not None:
        config, arrays = at_rank(config, arrays, args.rank)
    adapted = adapted_with(config, arrays, labels, start=load_start(config, args.run_dir))  # QLoRAM + EoRA
    if args.peft:  # before merging: export_peft reads the adapter factors, export_merged folds them away
        print(f"PEFT adapter: {export_peft(config, adapted, args.run_dir / 'peft')}")
    default_out = args.run_dir / ("merged" if args.rank is None else f"merged-rank-{args.rank}")
    out = export_merged(adapted, args.out or default_out)
    print(f"merged model: {out}")


if __name__ == "__main__":
    main()

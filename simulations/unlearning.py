"""Measure unlearning of one client: accuracy and a membership-inference score, before and after.

    python -m simulations.unlearning RUN_DIR --client ID --num-clients N [--adapter PATH]

Simulations only: this machine rebuilds every partition from the run seed (in a deployment, each client would
measure on its own data). For the run's final global adapter and the unlearned one (default: the newest of
RUN_DIR/unlearn/client-ID/adapter.safetensors), on
- `forgotten`: the leaving client's training split (what it trained on),
- `never-seen`: the server's global test set (no client trained on it),
- `retained`: every other client's training split,
it records accuracy, mean loss, and the loss-threshold membership AUC against `never-seen`
(common/privacy/membership.py; 0.5 = indistinguishable from unseen data). Unlearning should move the
forgotten data's accuracy and AUC toward never-seen's while the retained accuracy holds.
Written to RUN_DIR/unlearning.json (one entry per client) and a section of RUN_DIR/privacy.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from common.adapters.rank_resize import fit_ranks
from common.data.partition import client_data, global_test_set
from common.errors import FedloraError, exit_on_user_error
from common.evaluation import per_example_losses
from common.model import build_model, pick_device
from common.payload import load_state
from common.privacy.membership import membership_auc
from common.tensors import encode
from server.unlearn import run_config_of

SECTION = "## Unlearning"


def _scores(model, data, config, device) -> tuple[np.ndarray, float]:
    """(per-example losses, accuracy) in one pass: accuracy from whether the true class's loss is the least."""
    import torch

    from common.tensors import trim

    losses = per_example_losses(model, data, config.eval_batch_size, device)
    correct = 0
    with torch.no_grad():
        model.eval()
        for ids, mask, labels in torch.utils.data.DataLoader(data, batch_size=config.eval_batch_size):
            ids, mask = trim(ids, mask)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            correct += int((logits.argmax(-1).cpu() == labels).sum())
    return losses, correct / max(len(data), 1)


def measure(run_dir: Path, client: str, num_clients: int, adapters: dict[str, Path]) -> dict:
    config = run_config_of(run_dir)
    test = global_test_set(config)
    adapted = build_model(config, num_labels=len(test.label_names))
    device = pick_device()
    sets = {"forgotten": client_data(config, int(client), num_clients).train, "never-seen": test}
    others = [str(c) for c in range(num_clients) if str(c) != client]
    encoded = {name: encode(adapted.tokenizer, data, config.max_seq_len) for name, data in sets.items()}
    retained = {c: encode(adapted.tokenizer, client_data(config, int(c), num_clients).train, config.max_seq_len)
                for c in others}
    out = {"client": client, "num-clients": num_clients, "adapters": {k: str(v) for k, v in adapters.items()}}
    for label, path in adapters.items():
        arrays = load_file(str(path))
        fit_ranks(adapted.model, arrays)
        load_state(adapted.model, arrays)
        row = {}
        losses = {}
        for name, data in encoded.items():
            losses[name], accuracy = _scores(adapted.model, data, config, device)
            row[name] = {"examples": len(data), "accuracy": accuracy, "loss": float(np.mean(losses[name]))}
        row["forgotten"]["membership-auc"] = membership_auc(losses["forgotten"], losses["never-seen"])
        accs = {c: _scores(adapted.model, d, config, device)[1] for c, d in retained.items()}
        sizes = {c: len(d) for c, d in retained.items()}
        row["retained"] = {"examples": sum(sizes.values()), "by-client": accs,
                           "accuracy": float(sum(accs[c] * sizes[c] for c in accs) / max(sum(sizes.values()), 1))}
        out[label] = row
    return out


def write(run_dir: Path, result: dict) -> Path:
    path = run_dir / "unlearning.json"
    entries = json.loads(path.read_text()) if path.is_file() else {}
    entries[result["client"]] = result
    path.write_text(json.dumps(entries, indent=2))
    report = run_dir / "privacy.md"
    lines = [SECTION, "", "Measured by `python -m simulations.unlearning` (membership AUC: loss-threshold attack, "
             "forgotten client's training data against the never-seen global test set; 0.5 = indistinguishable).",
             "", "| client | adapter | forgotten acc | forgotten AUC | never-seen acc | retained acc |",
             "|---|---|---|---|---|---|"]
    for client, entry in sorted(entries.items()):
        for label in entry["adapters"]:
            r = entry[label]
            lines.append(f"| {client} | {label} | {r['forgotten']['accuracy']:.3f} | "
                         f"{r['forgotten']['membership-auc']:.3f} | {r['never-seen']['accuracy']:.3f} | "
                         f"{r['retained']['accuracy']:.3f} |")
    text = report.read_text() if report.is_file() else ""
    text = text.split(SECTION)[0].rstrip() + ("\n\n" if text else "") + "\n".join(lines) + "\n"
    report.write_text(text)
    return path


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Accuracy and membership AUC of a client's data, before and "
                                                 "after unlearning.")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--client", required=True)
    parser.add_argument("--num-clients", type=int, required=True)
    parser.add_argument("--adapter", type=Path, help="the unlearned global (default RUN_DIR/unlearn/client-ID/"
                                                     "adapter.safetensors)")
    args = parser.parse_args(argv)
    unlearned = args.adapter or args.run_dir / "unlearn" / f"client-{args.client}" / "adapter.safetensors"
    for needed in (args.run_dir / "adapter.safetensors", unlearned):
        if not needed.is_file():
            raise FedloraError(f"{needed} not found: run python -m server.unlearn first (or give --adapter)")
    result = measure(args.run_dir, args.client, args.num_clients,
                     {"trained": args.run_dir / "adapter.safetensors", "unlearned": unlearned})
    path = write(args.run_dir, result)
    for label in ("trained", "unlearned"):
        r = result[label]
        print(f"{label:>9}: forgotten acc {r['forgotten']['accuracy']:.3f} AUC {r['forgotten']['membership-auc']:.3f}"
              f" | never-seen acc {r['never-seen']['accuracy']:.3f} | retained acc {r['retained']['accuracy']:.3f}")
    print(f"written: {path} and {args.run_dir / 'privacy.md'}")


if __name__ == "__main__":
    main()

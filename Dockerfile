# speedrun in a container, for NVIDIA GPUs (README, "Docker"):
#   docker build -t speedrun .
#   docker run --gpus all --ipc=host --rm -v "$PWD/data:/workspace/data" -v "$PWD/runs:/workspace/runs" \
#       speedrun train --config record_124m ...
#
# BASE_IMAGE: any image whose python3 (>= 3.10) has PyTorch >= 2.9; the package is installed beside
# that torch and never replaces it. The default is the PyTorch release CI tests (2.13.0), built for
# CUDA 13.2 (NVIDIA driver >= 580; on an older driver pick a cuda12.x tag of the release). It is a
# runtime image: the pip wheels of torch carry their CUDA libraries, so a devel image would only
# add the CUDA compiler, which nothing here uses.
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda13.2-cudnn9-runtime
FROM ${BASE_IMAGE}

# EXTRAS: optional dependency groups of the package: fineweb (dataset download) by default; add fa4
# (FlashAttention-4, H100/H200, CUDA 13) with --build-arg EXTRAS=fineweb,fa4
ARG EXTRAS=fineweb
ARG USER_ID=1000

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# torch.compile builds native code at run time: Triton a C launcher (a Python extension) for its GPU
# kernels, inductor C++ kernels on the CPU. Runtime images may lack both a compiler and Python's
# headers, so the first compiled step would fail: add what is missing.
# hadolint ignore=DL3008
RUN missing=(); \
    command -v g++ >/dev/null || missing+=(g++); \
    python3 -c "import os, sys, sysconfig; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))" \
        || missing+=(python3-dev); \
    if (( ${#missing[@]} )); then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# Fail here, not after pip pulled a multi-GB torch into the image, when the base has no usable torch
RUN python3 -c "import sys, torch; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); \
sys.exit(0 if v >= (2, 9) else 'BASE_IMAGE has torch ' + torch.__version__ + '; speedrun needs torch >= 2.9')"

WORKDIR /opt/speedrun
COPY pyproject.toml README.md ./
COPY speedrun ./speedrun
# Into the base image's own Python, beside its torch. A distribution's Python is marked externally
# managed (PEP 668); in an image nothing else shares it, so pip is told to go ahead. The versions
# are pyproject.toml's (DL3013 asks for pins on the command line).
# hadolint ignore=DL3013
RUN PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-cache-dir ".[${EXTRAS}]" \
    && speedrun --version

# Caches that make restarts fast (bytecode, the embedded corpus's shards, inductor's and Triton's
# compiled kernels, FA4's JIT kernels) live in /cache: mount a named volume there to keep them.
# World-writable (sticky, like /tmp) so any --user can run the image, e.g. to own bind-mounted runs.
ENV XDG_CACHE_HOME=/cache \
    SPEEDRUN_CACHE=/cache/speedrun \
    TORCHINDUCTOR_CACHE_DIR=/cache/torchinductor \
    TRITON_CACHE_DIR=/cache/triton \
    FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=/cache/flash_attn \
    MPLCONFIGDIR=/cache/matplotlib \
    PYTHONUNBUFFERED=1

RUN useradd --create-home --uid "${USER_ID}" --user-group speedrun \
    && mkdir -p /workspace/data /workspace/runs /cache \
    && chown speedrun:speedrun /workspace /workspace/data /workspace/runs \
    && chmod 1777 /cache

# Commands run in /workspace, so the README's relative paths land in the volumes: data/... is the
# data volume, and runs/<date>-<time> (the default run directory) is in the runs volume
WORKDIR /workspace
VOLUME ["/workspace/data", "/workspace/runs", "/cache"]
# by number: a runtime can then check it is not root (Kubernetes' runAsNonRoot) without /etc/passwd
USER ${USER_ID}

ENTRYPOINT ["speedrun"]
CMD ["train"]

# syntax=docker/dockerfile:1
# The turbovideo RunPod serverless worker. RunPod runs linux/amd64 only:
#
#   docker build --platform linux/amd64 -t USER/turbovideo:0.1.0 .
#   docker build --platform linux/amd64 --build-arg BAKE_MODEL=TurboWan2.1-T2V-1.3B-480P \
#       --secret id=HF_TOKEN,env=HF_TOKEN -t USER/turbovideo:0.1.0-1.3b .
#
# Build arguments:
#   TORCH_CUDA_ARCH_LIST  GPU archs SpargeAttn is compiled for ("8.0;8.6;8.9;9.0"); "9.0" alone builds
#                         several times faster for H100/H200-only images; "" skips SpargeAttn (then
#                         attention=sagesla is unavailable; the default attention does not need it)
#   MAX_JOBS              parallel nvcc jobs for SpargeAttn (default: by cores and free memory)
#   BAKE_MODEL            a catalog model (or comma-separated list) whose checkpoints are baked into
#                         /models; the image then runs offline from them. Empty: use the volume.
#   BAKE_VARIANT          bf16 or quant: the checkpoint variant baked (and then served)
# See README "Deploy on RunPod (container image)" for sizes, build times and deployment.

ARG CUDA_VERSION=12.8.1

# ---- SpargeAttn wheel, compiled against the image's torch ----------------------------------------
# RunPod runs amd64 only; pinning it keeps a build on an arm64 laptop from making an unusable image.
# hadolint ignore=DL3029
FROM --platform=linux/amd64 nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04 AS spargeattn
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-dev python3.12-venv git ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.12 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /build
# Only what this stage reads: an edit to the runtime's requirements or install.sh does not recompile SpargeAttn.
COPY builder/requirements-cuda.txt builder/requirements-build.txt builder/constraints.txt builder/build_spargeattn.sh \
    builder/
RUN pip install -r builder/requirements-cuda.txt -r builder/requirements-build.txt -c builder/constraints.txt
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0"
ARG MAX_JOBS=""
RUN mkdir -p /wheels \
    && if [ -n "$TORCH_CUDA_ARCH_LIST" ]; then builder/build_spargeattn.sh --out /wheels; \
    else echo "TORCH_CUDA_ARCH_LIST is empty: SpargeAttn not built, attention=sagesla unavailable"; fi

# ---- the worker's base: Python, the system packages and the pinned requirements -------------------
# torch's wheels bring their own CUDA 12.8 libraries (cuBLAS, cuDNN, NCCL, ...), so the runtime
# starts from the small "base" image. Triton compiles its launchers with the system C compiler
# against Python's headers at run time, hence gcc and python3.12-dev.
# RunPod runs amd64 only; pinning it keeps a build on an arm64 laptop from making an unusable image.
# hadolint ignore=DL3029
FROM --platform=linux/amd64 nvidia/cuda:${CUDA_VERSION}-base-ubuntu24.04 AS base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 RUNPOD_LOG_LEVEL=INFO
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-dev python3.12-venv gcc libc6-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.12 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
# Requirements first: this multi-GB layer survives edits to the code (and to the SpargeAttn build's files).
COPY builder/install.sh builder/requirements-cuda.txt builder/requirements-cpu.txt builder/requirements-runtime.txt \
    builder/requirements-spargeattn.txt builder/constraints.txt builder/
RUN builder/install.sh --deps-only

# ---- baked checkpoints (BAKE_MODEL), downloaded by the worker's own cache code ----------------------
# A stage fed only by the few files the download runs, so that editing the rest of the worker does
# not download (and push) tens of GB again.
FROM base AS weights
COPY src/turbovideo/__init__.py src/turbovideo/catalog.py src/turbovideo/errors.py src/turbovideo/files.py \
    src/turbovideo/
COPY src/turbovideo/worker/__init__.py src/turbovideo/worker/checkpoints.py \
    src/turbovideo/worker/hub_transfer.py src/turbovideo/worker/locking.py src/turbovideo/worker/
COPY scripts/download_checkpoints.py scripts/
ARG BAKE_MODEL=""
ARG BAKE_VARIANT=bf16
# The token is a build secret, never a layer: --secret id=HF_TOKEN,env=HF_TOKEN (optional).
RUN --mount=type=secret,id=HF_TOKEN,env=HF_TOKEN \
    mkdir -p /models && if [ -n "$BAKE_MODEL" ]; then \
    case "$BAKE_VARIANT" in bf16 | quant) ;; \
    *) echo "BAKE_VARIANT must be bf16 or quant, not '$BAKE_VARIANT'" >&2; exit 1 ;; esac; \
    PYTHONPATH=src python scripts/download_checkpoints.py --model "$BAKE_MODEL" --variant "$BAKE_VARIANT" --dest /models; \
    fi

# ---- the worker -----------------------------------------------------------------------------------
FROM base AS runtime
# Before the code, so that its layer stays cached across code edits (empty when nothing is baked).
COPY --from=weights /models/ /models/
COPY --from=spargeattn /wheels/ /tmp/wheels/
COPY pyproject.toml README.md ./
COPY src/ src/
COPY kernels/ kernels/
# No SpargeAttn wheel when TORCH_CUDA_ARCH_LIST was empty: then the glob stays unmatched.
RUN set -- /tmp/wheels/*.whl && { [ -e "$1" ] || set --; } \
    && builder/install.sh "$@" && rm -rf /tmp/wheels build
COPY scripts/ scripts/
# `docker run IMAGE` outside RunPod runs test_input.json once and exits, as the SDK does locally.
COPY handler.py test_input.json ./

ARG BAKE_MODEL=""
ARG BAKE_VARIANT=bf16
# Baked: read checkpoints from /models, never the network, and serve the baked variant. Not baked:
# these are empty, which the worker treats as unset (CACHE_DIR then follows /runpod-volume).
# TRITON_CACHE_DIR is left to the worker (compile_cache.py), which checks the place is writable.
ENV CACHE_DIR=${BAKE_MODEL:+/models} \
    HF_HUB_OFFLINE=${BAKE_MODEL:+1} \
    CHECKPOINT_VARIANT=${BAKE_MODEL:+${BAKE_VARIANT}}

CMD ["python", "-u", "handler.py"]

#!/usr/bin/env bash
# Build SpargeAttn (package spas_sage_attn, needed only for attention=sagesla) as a wheel.
#
#   builder/build_spargeattn.sh [--src DIR] [--out DIR] [--prepare-only]
#
#   --src DIR       a SpargeAttn checkout (default: clone SPARGEATTN_REPO at SPARGEATTN_COMMIT)
#   --out DIR       where the wheel goes (default: ./wheels)
#   --prepare-only  copy (or clone) and patch the source, print its directory, build nothing
#
# Environment: TORCH_CUDA_ARCH_LIST (default "8.0;8.6;8.9;9.0": Ampere, Ada, Hopper), MAX_JOBS
# (default: one per core, at most one per 6 GiB of free memory), PYTHON, CUDA_HOME.
# Needs nvcc >= 12.4 and the torch the wheel will run with (it binds to that torch's C++ ABI).
# The checkout is never modified: the build runs on a copy.
set -euo pipefail

SPARGEATTN_REPO="${SPARGEATTN_REPO:-https://github.com/thu-ml/SpargeAttn.git}"
# HEAD of thu-ml/SpargeAttn on 2025-12-29 ("fix cuda launch error on devices < sm89").
SPARGEATTN_COMMIT="${SPARGEATTN_COMMIT:-bfd980b781784c04ad6a53e7ee657c0645d99171}"
# "fix sm90 pad_size": TurboDiffusion's SageSLA pads V to 128 rows, which older commits reject.
OLDEST_USABLE_COMMIT=01c4b48bca54d3b30d7601e9fc340ed1efd8e1b8

python="${PYTHON:-python}"
src=""
out="wheels"
prepare_only=0

usage() { sed -n '2,14s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }
die() { echo "build_spargeattn.sh: $*" >&2; exit 1; }

while (($#)); do
    case "$1" in
        --src) src="${2:?--src needs a directory}"; shift ;;
        --out) out="${2:?--out needs a directory}"; shift ;;
        --prepare-only) prepare_only=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "build_spargeattn.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;8.6;8.9;9.0}"
cuda_home="${CUDA_HOME:-/usr/local/cuda}"
nvcc="$cuda_home/bin/nvcc"
[[ -x "$nvcc" ]] || die "no nvcc at $nvcc; build inside a CUDA devel image or set CUDA_HOME"
cuda_version="$("$nvcc" --version | sed -n 's/.*release \([0-9]*\.[0-9]*\).*/\1/p')"
[[ -n "$cuda_version" ]] || die "could not read the CUDA version from $nvcc --version"

work="$(mktemp -d "${TMPDIR:-/tmp}/spargeattn.XXXXXX")"
if ((!prepare_only)); then
    trap 'rm -rf "$work"' EXIT
fi

if [[ -z "$src" ]]; then
    echo "cloning $SPARGEATTN_REPO at $SPARGEATTN_COMMIT"
    git clone --quiet --filter=blob:none "$SPARGEATTN_REPO" "$work/src"
    git -C "$work/src" checkout --quiet "$SPARGEATTN_COMMIT"
else
    [[ -f "$src/setup.py" ]] || die "$src has no setup.py; is it a SpargeAttn checkout?"
    # Only a checkout of its own with history: a plain copy inside another repository would report that
    # one's history.
    if [[ "$(git -C "$src" rev-parse --show-toplevel 2>/dev/null)" == "$(cd "$src" && pwd -P)" ]] &&
        git -C "$src" rev-parse --verify --quiet HEAD >/dev/null; then
        if git -C "$src" merge-base --is-ancestor "$OLDEST_USABLE_COMMIT" HEAD 2>/dev/null; then
            :
        elif [[ "$(git -C "$src" rev-parse --is-shallow-repository)" == true ]]; then
            # `git clone --depth N` keeps only the last N commits: the check cannot see that far back.
            echo "warning: $src is a shallow clone; cannot check it includes ${OLDEST_USABLE_COMMIT:0:7}" >&2
        else
            die "$src is older than SpargeAttn ${OLDEST_USABLE_COMMIT:0:7} (fix sm90 pad_size), which SageSLA needs"
        fi
    else
        echo "warning: $src is not a git checkout of its own; cannot check it includes ${OLDEST_USABLE_COMMIT:0:7}" >&2
    fi
    mkdir "$work/src"
    cp -a "$src/." "$work/src/"
fi

# CUDA 13's libcu++ and a forced host-side `#include <cassert>` both define std::__terminate, so with
# nvcc 13 every file fails ("redefinition of 'void std::__terminate()'", thu-ml/SpargeAttn#115, #122).
# The include only works around older toolkits; removing it builds cleanly on 13.x. CUDA 12.x keeps it.
if [[ "${cuda_version%%.*}" -ge 13 ]]; then
    sed -i '/-include,cassert/d' "$work/src/setup.py"
    ! grep -q 'include,cassert' "$work/src/setup.py" || die "could not remove the forced cassert include"
    echo "CUDA $cuda_version: removed setup.py's forced '-include cassert' (breaks nvcc 13)"
fi

# Record the archs this wheel has kernels for: with fewer than the GPU it lands on (a 9.0-only image on
# an L40S), turbovideo's attention=auto must not pick SageSLA there ("no kernel image" in every job).
mkdir -p "$work/src/spas_sage_attn"
printf '# Written by builder/build_spargeattn.sh: the GPU archs this build compiled kernels for.\nTORCH_CUDA_ARCH_LIST = "%s"\n' \
    "$TORCH_CUDA_ARCH_LIST" >"$work/src/spas_sage_attn/_turbovideo_build.py"

if ((prepare_only)); then
    echo "$work/src"
    exit 0
fi

if [[ -z "${MAX_JOBS:-}" ]]; then
    # Each nvcc job runs 8 threads (--threads=8) and can take several GB for the sm90 kernels.
    free_gib=$(($(awk '/MemAvailable/ {print $2}' /proc/meminfo) / 1048576))
    MAX_JOBS=$(nproc)
    ((free_gib / 6 < MAX_JOBS)) && MAX_JOBS=$((free_gib / 6))
    ((MAX_JOBS >= 1)) || MAX_JOBS=1
fi
export MAX_JOBS
# setup.py links with -lcuda; without a driver the toolkit's stub library stands in for it.
export LIBRARY_PATH="$cuda_home/lib64/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"

mkdir -p "$out"
echo "building spas_sage_attn: CUDA $cuda_version, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS"
started=$SECONDS
(cd "$work/src" && "$python" -m pip wheel --no-build-isolation --no-deps --wheel-dir "$work/dist" .)
cp "$work"/dist/spas_sage_attn-*.whl "$out/"
elapsed=$((SECONDS - started))
echo "built $(basename "$work"/dist/spas_sage_attn-*.whl) in ${elapsed} s ($((elapsed / 60)) min $((elapsed % 60)) s) into $out"

#!/usr/bin/env bash
# Install turbovideo and its pinned runtime requirements into the current Python ($PYTHON, else python).
#
#   builder/install.sh [--cpu] [--deps-only] [WHEEL ...]
#
#   --cpu        CI's torch (requirements-cpu.txt) instead of the image's CUDA 12.8 torch 2.8.0
#   --deps-only  requirements only, not the project (the Dockerfile caches this layer separately)
#   WHEEL ...    extra wheels to install as well, e.g. the SpargeAttn wheel from build_spargeattn.sh
#                (its Python imports come from requirements-spargeattn.txt)
#
# The image and a CI test (tests/test_image_install.py) both run this script with the same
# requirements-runtime.txt and constraints.txt, so the two cannot drift; only the torch line differs.
# It ends with `pip check`.
set -euo pipefail

builder="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$builder")"
python="${PYTHON:-python}"
torch_requirements="$builder/requirements-cuda.txt"
deps_only=0
wheels=()

usage() { sed -n '2,12s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }

while (($#)); do
    case "$1" in
        --cpu) torch_requirements="$builder/requirements-cpu.txt" ;;
        --deps-only) deps_only=1 ;;
        -h | --help) usage; exit 0 ;;
        -*) echo "install.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
        *)
            [[ -f "$1" ]] || { echo "install.sh: no such wheel: $1" >&2; exit 2; }
            wheels+=("$1")
            ;;
    esac
    shift
done

pip() { "$python" -m pip install --no-input "$@"; }

started=$SECONDS
# requirements-spargeattn.txt: what the SpargeAttn wheel imports (einops); --no-deps below skips it.
pip -r "$torch_requirements" -r "$builder/requirements-runtime.txt" -r "$builder/requirements-spargeattn.txt" \
    -c "$builder/constraints.txt"
if ((${#wheels[@]})); then
    # --no-deps: a wheel must not swap the pinned torch for another one.
    pip --no-deps "${wheels[@]}"
fi
if ((!deps_only)); then
    # The requirements above satisfy the project's; --no-deps keeps pip from re-resolving them.
    pip --no-deps "$root"
fi
"$python" -m pip check
echo "install.sh: done in $((SECONDS - started)) s ($(basename "$torch_requirements"))"

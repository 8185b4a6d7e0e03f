#!/usr/bin/env bash
# Generate one video on this machine through the same handler RunPod runs; no bucket needed.
#
#   scripts/runpod_quickstart.sh "a red fox trotting through snow" [out.mp4] ['{"num_frames": 33}']
#
# Without MODELS it runs the tiny random-weight models on the CPU: the whole real code path in
# seconds, but the video is noise. With MODELS set (e.g. MODELS=TurboWan2.1-T2V-1.3B-480P) and a
# CUDA GPU it downloads that model into CACHE_DIR once and makes a real video. The optional third
# argument adds request fields (see README: request fields); with "num_samples" above 1 the videos
# are written as out_0.mp4, out_1.mp4, ...
set -euo pipefail

if [ $# -lt 1 ] || [ -z "$1" ]; then
  echo "usage: $0 \"prompt\" [out.mp4] [extra request fields as JSON]" >&2
  exit 2
fi
prompt="$1"
out="${2:-quickstart.mp4}"
extra="${3:-{\}}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
if [ -z "${PYTHON:-}" ] && [ -x "$repo/.venv/bin/python" ]; then
  python="$repo/.venv/bin/python"
fi

# A Python without the project (a fresh checkout not set up yet, a system python3) would otherwise end in a
# traceback, after saying that MODELS needs a GPU.
if ! missing="$("$python" -c 'import importlib.util as u; print(*[m for m in ("torch", "runpod", "turbovideo") if u.find_spec(m) is None])' 2>/dev/null)"; then
  echo "$python does not run; set PYTHON to a Python 3.10+ with turbovideo installed (README: \"First two commands\")" >&2
  exit 1
fi
if [ -n "$missing" ]; then
  echo "$python cannot import $missing; set up this checkout first (README: \"First two commands\"), or set PYTHON to a Python that has turbovideo installed" >&2
  exit 1
fi

# The published models (not the tiny ones, which run anywhere) need a GPU.
real_models=$(printf '%s\n' "${MODELS:-}" | tr ',' '\n' | tr -d ' ' | grep -v -e '^tiny' -e '^$' || true)
if [ -n "$real_models" ] && ! "$python" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  echo "MODELS=$MODELS needs a CUDA GPU and none is usable here; running the tiny CPU models instead" >&2
  MODELS=tiny
fi
export MODELS="${MODELS:-tiny}"

# OUTPUT_DIR as the worker reads it (trimmed, ~ expanded), and a job folder no earlier run can have left
# (a container's shell has the same pid every run): removed once its videos are copied.
outputs="$("$python" -c 'import sys; from pathlib import Path; print(Path(sys.argv[1].strip() or sys.argv[2]).expanduser())' "${OUTPUT_DIR:-}" "$repo/outputs")"
mkdir -p "$outputs"
job_id="$(basename "$(mktemp -d "$outputs/quickstart-XXXXXXXX")")"
trap 'rmdir "$outputs/$job_id" 2>/dev/null || true' EXIT  # a run that failed before writing anything
job="$("$python" -c '
import json, sys
try:
    fields = json.loads(sys.argv[2])
except ValueError as e:
    sys.exit(f"the extra request fields are not valid JSON ({e}): {sys.argv[2]}")
if not isinstance(fields, dict):
    sys.exit(f"the extra request fields must be a JSON object such as {{\"seed\": 7}}, got: {sys.argv[2]}")
print(json.dumps({"id": sys.argv[3], "input": {"prompt": sys.argv[1], **fields}}))
' "$prompt" "$extra" "$job_id")"
mkdir -p "$(dirname "$out")"

# No bucket and no RunPod markers: one local job whose files land in $outputs/$job_id/.
env -u BUCKET_ENDPOINT_URL -u BUCKET_ACCESS_KEY_ID -u BUCKET_SECRET_ACCESS_KEY -u BUCKET_NAME \
  -u RUNPOD_WEBHOOK_GET_JOB -u RUNPOD_POD_ID OUTPUT_DIR="$outputs" \
  "$python" "$repo/handler.py" --test_input "$job"
samples=("$outputs/$job_id"/sample_*.mp4)
if [ "${#samples[@]}" -eq 1 ]; then
  cp "${samples[0]}" "$out"
  echo "wrote $out"
else
  for i in "${!samples[@]}"; do
    cp "$outputs/$job_id/sample_$i.mp4" "${out%.mp4}_$i.mp4"
    echo "wrote ${out%.mp4}_$i.mp4"
  done
fi
rm -rf "${outputs:?}/$job_id"

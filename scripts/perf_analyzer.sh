#!/usr/bin/env bash
# Load-test the lipsync models with Triton's perf_analyzer: lipsync_unary (one response per job),
# then lipsync over a gRPC stream (--streaming). The server must be running (lipsync-serve up/triton).
#
#   scripts/perf_analyzer.sh VIDEO AUDIO [more perf_analyzer arguments]
#
# Environment: TRITON_GRPC (host:port, default 127.0.0.1:8001), STEPS (DDIM steps per job, default 20),
# CONCURRENCY (perf_analyzer --concurrency-range, default 1), REQUESTS (jobs per measurement window,
# default 4), PYTHON (the environment with tritonclient; default .venv/bin/python, else python3).
set -euo pipefail
[ $# -ge 2 ] || { sed -n '2,10p' "$0" >&2; exit 2; }
video=$1 audio=$2
shift 2
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
[ -x "$python" ] || python=python3

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# perf_analyzer's JSON input: a BYTES tensor in "b64" is the serialized tensor, each element a 4-byte
# little-endian length followed by its bytes, then base64.
"$python" - "$video" "$audio" "${STEPS:-20}" >"$work/inputs.json" <<'PY'
import base64, json, struct, sys
from pathlib import Path

def element(path: str) -> dict[str, str]:
    data = Path(path).read_bytes()
    return {"b64": base64.b64encode(struct.pack("<I", len(data)) + data).decode()}

video, audio, steps = sys.argv[1:4]
json.dump({"data": [{"VIDEO": element(video), "AUDIO": element(audio), "STEPS": [int(steps)]}]}, sys.stdout)
PY

# The binary comes with the tritonclient wheel (in the environment's scripts folder) and links
# libcudart.so.12 (wheel nvidia-cuda-runtime-cu12) even on CPU, and libb64.so.0d (Debian libb64-0d).
read -r scripts cudart < <("$python" -c '
import sysconfig
from pathlib import Path
import nvidia.cuda_runtime
print(sysconfig.get_path("scripts"), Path(list(nvidia.cuda_runtime.__path__)[0]) / "lib")')
export LD_LIBRARY_PATH=$cudart${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

common=(-i grpc -u "${TRITON_GRPC:-127.0.0.1:8001}" --input-data "$work/inputs.json"
        --concurrency-range "${CONCURRENCY:-1}" --measurement-mode count_windows
        --measurement-request-count "${REQUESTS:-4}")
echo "== lipsync_unary"
"$scripts/perf_analyzer" -m lipsync_unary "${common[@]}" "$@"
echo "== lipsync (streaming)"
"$scripts/perf_analyzer" -m lipsync --streaming "${common[@]}" "$@"

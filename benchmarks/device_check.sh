#!/usr/bin/env bash
# The GPU checks of a session, in one call on the device machine (after the wheels are installed in
# /tmp/site with ../shared/tools/device-wheels): the GPU tests, the integrity tests, a MiniLM build
# with its onnxruntime-cuda engine, and the no-op rebuild's time. Usage: bash benchmarks/device_check.sh OUT
set -uo pipefail
out=${1:?usage: device_check.sh OUT}
mkdir -p "$out"
export PYTHONPATH=/tmp/site:. HF_HUB_OFFLINE=1
{
  echo "date: $(date -u +%FT%TZ)"; echo "commit: ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, onnxruntime as o; print('torch', torch.__version__, 'onnxruntime', o.__version__, o.get_available_providers())"
} > "$out/env.txt" 2>&1
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py > "$out/gpu-tests.log" 2>&1; echo "gpu tests rc=$?" >> "$out/summary.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_integrity.py > "$out/integrity-tests.log" 2>&1; echo "integrity tests rc=$?" >> "$out/summary.txt"
work=$(mktemp -d)
python3 -m trtforge build recipes/minilm.toml --out "$work" > "$out/minilm-build.log" 2>&1; echo "minilm build rc=$?" >> "$out/summary.txt"
cp "$work/minilm/manifest.json" "$out/manifest-minilm.json" 2>/dev/null
for i in 1 2 3; do
  python3 - "$work" "$i" >> "$out/summary.txt" <<'PY'
import subprocess, sys, time
start = time.perf_counter()
rc = subprocess.run([sys.executable, "-m", "trtforge", "build", "recipes/minilm.toml", "--out", sys.argv[1], "-q"]).returncode
print(f"no-op rebuild {sys.argv[2]}: rc={rc} {time.perf_counter() - start:.2f} s")
PY
done
python3 -m trtforge inspect "$work/minilm" > "$out/minilm-inspect.txt" 2>&1; echo "inspect rc=$?" >> "$out/summary.txt"
tail -n 3 "$out/gpu-tests.log" "$out/integrity-tests.log" >> "$out/summary.txt"
cat "$out/summary.txt"

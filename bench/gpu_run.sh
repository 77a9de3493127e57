#!/usr/bin/env bash
# One-shot engine benchmark on the device machine (nvidia-h200-x2 or -x4), run from the repository root
# through the device tool with `carry: [".whl/b1"]`:
#   bash bench/gpu_run.sh [--only calibration,kvload,...]
# Installs the carried wheels the image lacks (pydantic and its deps) into /tmp/site, records the machine
# (nvidia-smi, topology, versions), runs `python -m bench.engine` (gpu preset) with NVLink multicast kept
# off, and leaves results.json, summary.md, machine.txt, log.txt and engine-logs.tar.gz in $OUT.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/b1/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD/engine_image:$PWD"
{
  date -u
  nvidia-smi
  nvidia-smi topo -m
  python3 -c 'import torch, sys; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())'
  nproc
  free -g
} >"$OUT/machine.txt" 2>&1
timeout "${BENCH_TIMEOUT_S:-560}" python3 -m bench.engine --out "$OUT" "$@" >"$OUT/log.txt" 2>&1
status=$?
out_abs=$(cd "$OUT" && pwd)
(cd /dev/shm && tar -czf "$out_abs/engine-logs.tar.gz" bench-engine-*/*/*.log) 2>/dev/null
tail -c 9000 "$OUT/summary.md" 2>/dev/null || tail -n 60 "$OUT/log.txt"
exit $status

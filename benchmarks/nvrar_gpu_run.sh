#!/usr/bin/env bash
# NVRAR on the 4-GPU machine, one batch: timing (4 GPUs; 2x2 virtual nodes; 2 GPUs) and the
# GPU tests. Logs and JSON results go to $OUT (default ./out). Run from the repository root with
# NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 set.
set -u -o pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
for v in NCCL_NVLS_ENABLE:0 TORCH_SYMM_MEM_DISABLE_MULTICAST:1 NVSHMEM_DISABLE_NVLS:1; do
  name=${v%%:*}; want=${v#*:}
  [ "${!name:-}" = "$want" ] || { echo "set $name=$want (NVLink multicast must stay off)"; exit 2; }
done
run() { echo "=== $*"; }
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
nvidia-smi topo -m | tee -a "$OUT/gpu.txt"
TR="python3 -m torch.distributed.run --standalone"
run "4 GPUs, one node"
timeout "${T_DEV4:-75}" $TR --nproc-per-node 4 benchmarks/nvrar_dev.py \
  --out "$OUT/nvrar_dev_4gpu.json" 2>&1 | tee "$OUT/dev4.log" | grep -v "^\[artune INFO\]"
run "GPU tests"
timeout "${T_TEST:-150}" python3 -m pytest -v -s -p no:cacheprovider tests/gpu/test_nvrar_gpu.py \
  2>&1 | tee "$OUT/pytest.log" | grep -E "PASS|FAIL|SKIP|ERROR|Error|assert|soak|passed|failed"
run "2 GPUs"
CUDA_VISIBLE_DEVICES=0,1 timeout "${T_DEV2:-30}" $TR --nproc-per-node 2 benchmarks/nvrar_dev.py \
  --sizes 4K,16K,64K,256K,1M --out "$OUT/nvrar_dev_2gpu.json" 2>&1 | tee "$OUT/dev2.log" \
  | grep -v "^\[artune INFO\]"
run "4 GPUs as 2 virtual nodes x 2 (emulation)"
timeout "${T_DEV22:-30}" $TR --nproc-per-node 4 benchmarks/nvrar_dev.py --ranks-per-node 2 \
  --sizes 4K,64K,256K,1M,4M,16M --out "$OUT/nvrar_dev_2x2.json" 2>&1 | tee "$OUT/dev2x2.log" \
  | grep -v "^\[artune INFO\]"
exit 0

#!/usr/bin/env bash
# #18 / #24 session 14 on nvidia-h200-x2 (2 GPUs, NCCL): where TP = 2's decode step goes at
# B = 256 (5.76 ms vs TP = 1's 1.62 ms in session 13), after the greedy argmax gather
# (every row greedy: each rank sends [B, 2] (max, id) instead of its [B, V/2] logits).
#   1. the TP tests on the GPUs: test_tp_graphs.py (its cuda-marked NCCL graph test) and
#      test_tp_library.py
#   2. the link: nvidia-smi topo, peer access, NCCL's transport, and the collectives of one
#      step timed alone (bench/nccl_link_probe.py: all-reduce, logits gather, argmax gather);
#      again with NCCL_P2P_LEVEL=SYS when NCCL did not pick P2P (in a VM NCCL may see the GPUs
#      as far apart on PCIe and not use P2P even where CUDA allows it)
#   3. bench/tp_decode.py --tp 1 2 --batch 16 256 --profile (CUDA graphs on both ranks): the
#      generate() rows as in session 13, then per variant B = 256 steady decode steps timed
#      one by one with rank 0's host split, and torch.profiler's top ops
# Carry .whl. Whole script < 200 s. Everything lands in $OUT (6 files).
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
export MOSKA_TP_CUDA_GRAPHS=1  # TP CUDA graphs are opt-in until measured
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD
start=$SECONDS
timeout 60 python3 -m pytest -q -p no:cacheprovider -rs tests/distributed/test_tp_graphs.py \
  tests/distributed/test_tp_library.py > "$OUT/tp_tests.log" 2>&1
echo "tests rc=$? ($((SECONDS - start)) s)"; tail -4 "$OUT/tp_tests.log" | cut -c1-300
{
  nvidia-smi topo -m
  python3 -c 'import torch; print("peer access 0->1:", torch.cuda.can_device_access_peer(0, 1))'
  NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,P2P,SHM,NET timeout 20 python3 bench/nccl_link_probe.py \
    --out "$OUT/nccl_link_probe_h200x2.json"
  echo "probe rc=$?"
} > "$OUT/nccl_link_probe.log" 2>&1
if ! grep -q "via P2P" "$OUT/nccl_link_probe.log"; then
  {
    echo "== NCCL_P2P_LEVEL=SYS (the default run used no P2P)"
    NCCL_P2P_LEVEL=SYS NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,P2P timeout 20 python3 \
      bench/nccl_link_probe.py --out "$OUT/nccl_link_probe_p2psys_h200x2.json"
    echo "probe p2p-sys rc=$?"
  } >> "$OUT/nccl_link_probe.log" 2>&1
fi
grep -E "GPU0|GPU1|peer access|via |probe|^summary|^==|capture failed" "$OUT/nccl_link_probe.log" \
  | sed -E 's/^.*NCCL INFO //; s/Channel [0-9]+\/[0-9]+/Channel */; s/[0-9]+\[[0-9]+\]/r/g' \
  | awk '!seen[$0]++' | head -24 | cut -c1-600
echo "($((SECONDS - start)) s)"
timeout 100 python3 bench/tp_decode.py --tp 1 2 --batch 16 256 --profile \
  --out "$OUT/tp_decode_profile_h200x2.json" > "$OUT/tp_decode.log" 2>&1
echo "tp_decode rc=$? ($((SECONDS - start)) s)"
grep -E "^\{'tp'|^steady|top_self_device|^summary|Error" "$OUT/tp_decode.log" | cut -c1-600
tail -3 "$OUT/tp_decode.log" | cut -c1-300

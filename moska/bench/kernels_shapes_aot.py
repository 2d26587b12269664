"""Compile the grouped kernel's tiles for Hopper (sm_90) without a GPU:
`python -m moska.bench.kernels_shapes_aot [--candidates] [--gqa 1,2,4,8]`.

Every tile of the tuning table (moska/kernels/shared_tuning.py), and with `--candidates`
every tile the GPU sweep (kernels_shapes.py) times, compiled ahead of time by Triton's own
compiler and ptxas for each head dim x GQA ratio, bf16. Prints one JSON line per compile:
seconds and the shared memory the launch would ask for; exits 1 if any fails or asks for
more than an H100/H200 block may take (227 KiB), so a table edit that cannot launch shows
on a CPU machine. The signature mirrors `grouped_shared_attention`'s launch (pointer or TMA
loads, no FP8): keep the two together.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from moska.bench.kernels_shapes import CANDIDATES, tag
from moska.kernels.shared_attention import _grouped_shared_attention_kernel
from moska.kernels.shared_tuning import TABLE, GroupedTuning

SMEM_LIMIT = 232448  # bytes of shared memory one block may take on sm_90
POINTERS = {
    **dict.fromkeys(("q_ptr", "k_ptr", "v_ptr", "o_ptr"), "*bf16"),
    **dict.fromkeys(("lse_ptr", "o_part_ptr", "lse_part_ptr"), "*fp32"),
    **dict.fromkeys(
        ("starts_ptr", "ends_ptr", "sel_req_ptr", "sel_kv_ptr", "sel_chunk_ptr", "work_ptr"),
        "*i32",
    ),
    "meta_ptr": "*i32",
}


def sm90_signature(fn, pointers: dict, descs: dict, consts: dict) -> dict:
    """`triton.compile`'s signature of a grouped attention kernel: `pointers` and `descs`
    (name -> type), strides and W i32, qk_scale fp32, every other argument a constexpr
    (added to `consts` as None unless given there)."""
    sig: dict = {}
    for name in fn.arg_names:
        if name in pointers:
            sig[name] = pointers[name]
        elif name.startswith("stride") or name == "W":
            sig[name] = "i32"
        elif name == "qk_scale":
            sig[name] = "fp32"
        elif name in descs:
            sig[name] = descs[name]
        else:
            sig[name] = "constexpr"
            consts.setdefault(name, None)
    return sig


def compile_sm90(d: int, g: int, t: GroupedTuning) -> dict:
    """One ahead-of-time compile: {"seconds", "shared_bytes"}."""
    fn = _grouped_shared_attention_kernel
    consts: dict = {
        "G": g, "D": d, "BLOCK_M": t.block_m, "BLOCK_N": t.block_n, "USE_TMA": t.use_tma,
        "WARP_SPEC": t.warp_specialize, "PRECISION": "tf32", "PERSISTENT": False,
        "k_scale_ptr": None, "v_scale_ptr": None, "stride_sc": 0, "KV_FP8": False,
        "FP8_DOT": False, "CDTYPE": None, "PER_TOKEN": False, "HALF_TAIL": t.half_tail,
    }  # fmt: skip
    desc = f"tensordesc<bf16[{t.block_n},{d}]>"
    descs = {"k_desc": desc, "v_desc": desc} if t.use_tma else {}  # else: None constexprs
    sig = sm90_signature(fn, POINTERS, descs, consts)
    t0 = time.time()
    k = triton.compile(
        ASTSource(fn, sig, consts),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": t.num_warps, "num_stages": t.num_stages},
    )
    return {
        "seconds": round(time.time() - t0, 2),
        "shared_bytes": k.metadata.shared,
        **ptxas_usage(k),
    }


def ptxas_usage(k) -> dict:
    """Registers per thread and local (spill) bytes of the compiled kernel, from
    `cuobjdump --dump-resource-usage` on its cubin (what decides a tile's occupancy beside
    shared memory: 64K registers per SM); {} without cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(k.asm["cubin"])
        cmd = [tool, "--dump-resource-usage", path]
        out = subprocess.run(cmd, check=False, capture_output=True, text=True)
    use = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", out.stdout))
    return {
        "registers": int(use.get("REG", -1)),
        "local_bytes": int(use.get("LOCAL", -1)),
        "stack_bytes": int(use.get("STACK", -1)),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", action="store_true", help="also the sweep's candidates")
    ap.add_argument("--gqa", default="1,2,4,8", help="comma-separated GQA ratios")
    args = ap.parse_args(argv)
    jobs = {(e.head_dim, g, e.tuning) for e in TABLE for g in map(int, args.gqa.split(","))}
    if args.candidates:
        jobs |= {(d, g, t) for d, g, _ in list(jobs) for t in CANDIDATES}
    bad = 0
    for d, g, t in sorted(jobs, key=lambda j: (j[0], j[1], tag(j[2]))):
        row: dict[str, Any] = {"D": d, "G": g, "tile": tag(t)}
        try:
            row.update(compile_sm90(d, g, t))
            row["fits"] = row["shared_bytes"] <= SMEM_LIMIT
        except Exception as e:  # noqa: BLE001 - report every failing tile, then fail
            row["error"] = repr(e)[:300]
        bad += not row.get("fits", False)
        print(json.dumps(row), flush=True)
    print(f"{len(jobs) - bad} of {len(jobs)} tiles compile for sm_90 and fit")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

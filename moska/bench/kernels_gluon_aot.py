"""Compile the Gluon one-chunk kernel for Hopper (sm_90) without a GPU:
`python -m moska.bench.kernels_gluon_aot` (one JSON line per variant: seconds, shared
memory, registers and spills from the cubin when cuobjdump is there; exit 1 on a failure).
Needs the Triton whose Gluon API the kernel is written for (the device image's 3.6; e.g.
`pip install --target /tmp/tri36 triton==3.6.0` and `PYTHONPATH=/tmp/tri36`). The signature
mirrors `gluon_one_chunk`'s launch: keep the two together."""

import json
import os
import re
import subprocess
import sys
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource

from moska.kernels.gluon_grouped import WS3_MAXNREG, _grouped_ws_kernel
from moska.kernels.gluon_one_chunk import _one_chunk_kernel, _one_chunk_ws_kernel
from moska.kernels.gluon_parts import WS_MAXNREG

ARGS = ["q_ptr", "k_desc", "v_desc", "o_ptr", "lse_ptr", "o_part_ptr", "lse_part_ptr"]
ARGS += ["stride_qb", "stride_qh", "M", "S", "split_len", "qk_scale"]
CONST = ["G", "D", "BLOCK_M", "BLOCK_N", "STAGES", "SPLIT", "num_warps"]


def compile_variant(
    d: int, g: int, bm: int, bn: int, nw: int, st: int, split: bool, schedule: str = "pipe"
) -> dict:
    lay = gl.NVMMASharedLayout.get_default_for([bn, d], gl.bfloat16)
    td = f"tensordesc<bf16[{bn}, {d}],{lay!r}>"
    types = ["*bf16", td, td, "*bf16", "*fp32", "*fp32", "*fp32", "i32", "i32", "i32", "i32"]
    sig = dict(zip(ARGS, [*types, "i32", "fp32"], strict=True)) | dict.fromkeys(CONST, "constexpr")
    vals = dict(zip(CONST, (g, d, bm, bn, st, split, nw), strict=True))
    fn, opts = _one_chunk_kernel, {"num_warps": nw}
    if schedule != "pipe":
        fn, opts = _one_chunk_ws_kernel, {"num_warps": 4, "maxnreg": WS_MAXNREG}
        vals["num_warps"] = 4
        sig["OVERLAP"], vals["OVERLAP"] = "constexpr", "o" in schedule[2:]
        sig["EXP_BF16"], vals["EXP_BF16"] = "constexpr", "e" in schedule[2:]
        sig["KV_APART"], vals["KV_APART"] = "constexpr", "k" in schedule[2:]
    names = list(sig)
    src = GluonASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in vals.items()})
    t = time.time()
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    out = {"D": d, "G": g, "schedule": schedule, "tile": f"m{bm}n{bn}w{nw}s{st}", "split": split}
    out["ok"] = True
    out |= {"seconds": round(time.time() - t, 2), "shared": k.metadata.shared}
    out |= _resources(k.asm.get("cubin"))
    return out


GROUPED_ARGS = ["q_ptr", "k_desc", "v_desc", "starts_ptr", "ends_ptr", "sel_req_ptr"]
GROUPED_ARGS += ["sel_kv_ptr", "sel_chunk_ptr", "work_ptr", "meta_ptr", "o_ptr", "lse_ptr"]
GROUPED_ARGS += ["o_part_ptr", "lse_part_ptr", "stride_qb", "stride_qh", "W", "qk_scale"]
GROUPED_CONST = ["G", "D", "BLOCK_M", "BLOCK_N", "STAGES", "num_warps", "OVERLAP", "EXP_BF16"]
GROUPED_CONST += ["KV_APART", "NWG"]


def compile_grouped(
    d: int,
    g: int,
    bm: int,
    bn: int,
    st: int,
    overlap: bool = False,
    exp_bf16: bool = False,
    kv_apart: bool = False,
    nwg: int = 2,
) -> dict:
    """The grouped ping-pong kernel (gluon_grouped.py) for sm_90."""
    lay = gl.NVMMASharedLayout.get_default_for([bn, d], gl.bfloat16)
    td = f"tensordesc<bf16[{bn}, {d}],{lay!r}>"
    types = ["*bf16", td, td] + ["*i32"] * 7 + ["*bf16", "*fp32", "*fp32", "*fp32"]
    types += ["i32", "i32", "i32", "fp32"]
    sig = dict(zip(GROUPED_ARGS, types, strict=True)) | dict.fromkeys(GROUPED_CONST, "constexpr")
    cx_vals = (g, d, bm, bn, st, 4, overlap, exp_bf16, kv_apart, nwg)
    vals = dict(zip(GROUPED_CONST, cx_vals, strict=True))
    names = list(sig)
    cx = {(names.index(k),): v for k, v in vals.items()}
    src = GluonASTSource(_grouped_ws_kernel, sig, constexprs=cx)
    t = time.time()
    opts = {"num_warps": 4, "maxnreg": WS_MAXNREG if nwg == 2 else WS3_MAXNREG}
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    out = {
        "D": d,
        "G": g,
        "nwg": nwg,
        "schedule": "grouped_ws" + "o" * overlap + "e" * exp_bf16 + "k" * kv_apart,
        "tile": f"m{bm}n{bn}s{st}",
    }
    out["ok"] = True
    out |= {"seconds": round(time.time() - t, 2), "shared": k.metadata.shared}
    return out | _resources(k.asm.get("cubin"))


def _resources(cubin: bytes | None) -> dict:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    if not cubin or not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        txt = subprocess.run(
            [tool, "-res-usage", f.name], capture_output=True, text=True, check=False
        ).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", txt)
    return {"regs": int(m.group(1)), "stack": int(m.group(2))} if m else {}


def main() -> None:
    fails = 0
    pipe = ((128, 128, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3), (64, 128, 4, 2), (128, 128, 8, 3))
    tiles = [("pipe", *t) for t in pipe] + [("ws", 64, 128, 4, 2), ("ws", 64, 128, 4, 3)]
    tiles += [("wso", 64, 128, 4, 3), ("wsoe", 64, 128, 4, 3), ("wse", 64, 128, 4, 3)]
    tiles += [("wsk", 64, 128, 4, 3), ("wsok", 64, 128, 4, 3)]
    for d in (128, 64):
        for sched, bm, bn, nw, st in tiles:
            for split in (False, True):
                try:
                    out = compile_variant(d, 4, bm, bn, nw, st, split, sched)
                    print(json.dumps(out), flush=True)
                except Exception as e:  # noqa: BLE001 - every variant is tried, failures counted
                    fails += 1
                    err = {"D": d, "tile": (sched, bm, bn, nw, st), "ok": False}
                    print(json.dumps(err | {"error": repr(e)[:400]}), flush=True)
    for d in (128, 64):
        grouped = [(128, 2, False, False, 2), (128, 3, False, False, 2), (128, 3, True, False, 2)]
        grouped += [(128, 3, True, True, 2), (64, 5, False, False, 3), (64, 5, True, False, 3)]
        for bn, st, ov, ex, nwg in grouped:
            try:
                out = compile_grouped(d, 4, 64, bn, st, ov, ex, nwg=nwg)
                print(json.dumps(out), flush=True)
            except Exception as e:  # noqa: BLE001
                fails += 1
                print(json.dumps({"D": d, "grouped_ws": st, "ok": False, "error": repr(e)[:600]}))
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()

"""The FP8 program's tiles of `moska.bench.fp8_occupancy` compiled for sm_90 on CPU (session 27,
issue 16): shared memory, registers, stack (spills) and the SASS of its first key loop (the
unmasked one): instructions a warp per key block, exp2s and conversions on the XU pipe, FP8
MMAs, spill loads / stores. Needs Triton 3.6 (the device's) beside the venv:

    pip install --target /tmp/t36/site triton==3.6.0
    PYTHONPATH=/tmp/t36/site:. python bench/fp8_occupancy_aot.py bench/results/fp8_occupancy_aot_session27.json
"""

import collections
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from moska.bench.fp8_occupancy import FP8
from moska.bench.kernels_shapes_aot import ptxas_usage, sm90_signature
from moska.kernels.shared_attention_fp8 import _grouped_fp8_mma_kernel as FN

PTRS = {
    **dict.fromkeys(("q_ptr", "o_ptr"), "*bf16"),
    **dict.fromkeys(("k_ptr", "v_ptr"), "*fp8e4nv"),
}
PTRS.update(
    dict.fromkeys(("lse_ptr", "o_part_ptr", "lse_part_ptr", "k_scale_ptr", "v_scale_ptr"), "*fp32")
)
PTRS.update(dict.fromkeys(("starts_ptr", "ends_ptr", "sel_req_ptr", "sel_kv_ptr", "sel_chunk_ptr",
                           "work_ptr", "meta_ptr"), "*i32"))  # fmt: skip


def compile_tile(t: dict, d: int = 128, g: int = 4):
    """The launch `fp8_occupancy` makes (block scales both sides, V token-major, one-term q)."""
    bn = t["block_n"]
    consts = {
        "G": g, "D": d, "BLOCK_M": t["block_m"], "BLOCK_N": bn, "USE_TMA": True,
        "WARP_SPEC": False, "PRECISION": "tf32", "PERSISTENT": False, "KV_FP8": True,
        "FP8_DOT": False, "CDTYPE": None, "PER_TOKEN": True, "chunk_scale_ptr": None,
        "CHUNK_SCALE": False, "V_T": True, "Q_SPLIT": False, "RAW_MAX": True, "TOKEN_V2": True,
        "SCALE_BLOCK": 128, "QSPLIT_ACC": True, "SCALE_SIDES": 3, "SC_NOMASK": False,
        "EX2_F16": 0, "HALF_TAIL": bool(t.get("half_tail")),
    }  # fmt: skip
    descs = {"k_desc": f"tensordesc<fp8e4nv[{bn},{d}]>", "v_desc": f"tensordesc<fp8e4nv[{d},{bn}]>"}
    sig = sm90_signature(FN, PTRS, descs, consts)
    opts = {"num_warps": t["num_warps"], "num_stages": t["num_stages"]}
    if t.get("maxnreg"):
        opts["maxnreg"] = t["maxnreg"]
    return triton.compile(
        ASTSource(FN, sig, consts), target=GPUTarget("cuda", 90, 32), options=opts
    )


def hot_loop(k) -> dict:
    """Opcode counts of the first loop of >= 100 instructions (a backward branch's body)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(k.asm["cubin"])
        sass = subprocess.run([tool, "-sass", path], check=False, capture_output=True, text=True)
        sass = sass.stdout
    ins = [(int(a, 16), t) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", sass)]
    for addr, txt in ins:
        tgt = re.search(r"BRA\s.*?0x([0-9a-f]+)", txt)
        if tgt and int(tgt.group(1), 16) < addr:
            body = [t for a, t in ins if int(tgt.group(1), 16) <= a <= addr]
            if len(body) >= 100:
                ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0]
                                          for t in body)  # fmt: skip
                keep = ("MUFU", "F2FP", "QGMMA", "LDL", "STL", "SHFL", "BAR")
                return {
                    "hot_loop_instructions": len(body),
                    **{f"hot_loop_{o}": ops[o] for o in keep},
                }
    return {}


def main() -> int:
    out = {"what": __doc__.splitlines()[0], "command": " ".join(["python", *sys.argv]),
           "triton": triton.__version__, "tiles": {}}  # fmt: skip
    for name, t in FP8.items():
        k = compile_tile(t)
        out["tiles"][name] = {**t, "shared": k.metadata.shared, **ptxas_usage(k), **hot_loop(k)}
        print(name, json.dumps(out["tiles"][name]), flush=True)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

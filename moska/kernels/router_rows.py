"""The Triton building blocks the router's score kernels share (``router_scores.py``: the
summary and pair kernels; ``router_dense.py``: the default's one-launch key-max):
``_load_q_rows`` loads a tile's query rows (requests x the GQA group of one KV head) and
``_keymax_rows`` streams one chunk's low-rank keys past them, keeping the running maximum
of the logits (the key-max score of each request)."""

import triton
import triton.language as tl


# fmt: off
@triton.jit
def _load_q_rows(q_ptr, stride_qb, stride_qh, req, row_ok, h, G, D,
                 BLOCK_B: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    # fmt: on
    # Returns q rows [BLOCK_B * BLOCK_G, BLOCK_D] of KV head h for requests `req` [BLOCK_B].
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = (
        q_ptr
        + req[:, None, None] * stride_qb
        + (h * G + offs_g)[None, :, None] * stride_qh
        + offs_d[None, None, :]
    )
    mask = row_ok[:, None, None] & (offs_g < G)[None, :, None] & (offs_d < D)[None, None, :]
    rows = tl.load(ptrs, mask=mask, other=0.0)
    return tl.reshape(rows, (BLOCK_B * BLOCK_G, BLOCK_D))


# fmt: off
@triton.jit
def _keymax_rows(
    q_ptr, basis_ptr, lk_ptr, req, row_ok, h, lo, hi, G, D, R,
    stride_qb, stride_qh, stride_bh, stride_bd, stride_ks, stride_kh,
    PRECISION: tl.constexpr, EVEN_R: tl.constexpr, F16_ACC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, PROJECTED: tl.constexpr = False,
    UNROLL: tl.constexpr = 1,
):
    # fmt: on
    # Key-max scores [BLOCK_B] of requests `req` (row_ok: real rows) for KV head h over the
    # key rows lo:hi of one chunk (lo == hi: -inf). PROJECTED: q_ptr holds the queries
    # already projected and cast ([B, Hq, R] in the low-rank keys' dtype, `project_queries`):
    # no basis load and no projection per tile.
    offs_r = tl.arange(0, BLOCK_R)
    if F16_ACC:
        acc_dtype = tl.float16
    else:
        acc_dtype = tl.float32
    if PROJECTED:
        qr = _load_q_rows(q_ptr, stride_qb, stride_qh, req, row_ok, h, G, R, BLOCK_B, BLOCK_G,
                          BLOCK_R)  # fmt: skip
    else:
        q = _load_q_rows(q_ptr, stride_qb, stride_qh, req, row_ok, h, G, D, BLOCK_B, BLOCK_G,
                         BLOCK_D)  # fmt: skip
        # project onto the head's basis: [BLOCK_M, BLOCK_D] @ [BLOCK_D, BLOCK_R]
        offs_d = tl.arange(0, BLOCK_D)
        basis = tl.load(
            basis_ptr + h * stride_bh + offs_d[:, None] * stride_bd + offs_r[None, :],
            mask=(offs_d < D)[:, None] & (offs_r < R)[None, :],
            other=0.0,
        )
        qr = tl.dot(q, basis, input_precision=PRECISION)  # fp32
        if F16_ACC:
            # fp16 operands and logits: clamp so no operand is inf (inf * 0 makes a NaN)
            qr = tl.minimum(tl.maximum(qr, -65504.0), 65504.0)
        qr = qr.to(lk_ptr.dtype.element_ty)
    # Running max kept elementwise over a [rows, BLOCK_N] tile (one max per score, no
    # cross-thread reduction per block); reduced over the keys once at the end. Full blocks
    # load unmasked; only the chunk's last partial block is masked.
    best = tl.full((BLOCK_B * BLOCK_G, BLOCK_N), float("-inf"), acc_dtype)
    offs_n = tl.arange(0, BLOCK_N)
    lk_ptrs = (
        lk_ptr
        + lo.to(tl.int64) * stride_ks
        + h * stride_kh
        + (offs_n[None, :] * stride_ks + offs_r[:, None])
    )  # [BLOCK_R, BLOCK_N]: keys loaded transposed
    full_hi = lo + (hi - lo) // BLOCK_N * BLOCK_N
    start = lo
    if UNROLL == 2:
        # Two key blocks per iteration, both products issued before either max: the second
        # block's MMA can run while the first block's maxima are taken (the max of a logit
        # costs the SM about as much as its K = r product). Same logits, same exact maxima.
        start = lo + (hi - lo) // (2 * BLOCK_N) * (2 * BLOCK_N)
        for _ in range(lo, start, 2 * BLOCK_N):
            if EVEN_R:
                lk0 = tl.load(lk_ptrs)
                lk1 = tl.load(lk_ptrs + BLOCK_N * stride_ks)
            else:
                lk0 = tl.load(lk_ptrs, mask=(offs_r < R)[:, None])
                lk1 = tl.load(lk_ptrs + BLOCK_N * stride_ks, mask=(offs_r < R)[:, None])
            s0 = tl.dot(qr, lk0, input_precision=PRECISION, out_dtype=acc_dtype)
            s1 = tl.dot(qr, lk1, input_precision=PRECISION, out_dtype=acc_dtype)
            best = tl.maximum(best, tl.maximum(s0, s1))
            lk_ptrs += 2 * BLOCK_N * stride_ks
    for _ in range(start, full_hi, BLOCK_N):
        if EVEN_R:
            lk = tl.load(lk_ptrs)
        else:
            lk = tl.load(lk_ptrs, mask=(offs_r < R)[:, None])
        best = tl.maximum(best, tl.dot(qr, lk, input_precision=PRECISION, out_dtype=acc_dtype))
        lk_ptrs += BLOCK_N * stride_ks
    if full_hi < hi:
        key_ok = (full_hi + offs_n) < hi
        lk = tl.load(
            lk_ptrs,
            mask=key_ok[None, :] & (offs_r < R)[:, None],
            other=0.0,
        )
        s = tl.dot(qr, lk, input_precision=PRECISION, out_dtype=acc_dtype)
        best = tl.maximum(best, tl.where(key_ok[None, :], s, float("-inf")))
    best = tl.max(best.to(tl.float32), axis=1)
    best = tl.reshape(best, (BLOCK_B, BLOCK_G))
    return tl.max(tl.where((tl.arange(0, BLOCK_G) < G)[None, :], best, float("-inf")), axis=1)


@triton.jit
def _dense_item(w, T, TPC, B, offsets_ptr, BLOCK_B: tl.constexpr):
    # Work item w of a dense key-max grid (every request scores every chunk): items are
    # (tile t, head h), t fastest, so a chunk's TPC request tiles run side by side and share
    # its keys in L2. Returns (h, chunk, req [BLOCK_B], req_ok, lo, hi): the KV head, the
    # chunk, its tile's requests and the chunk's key rows lo:hi.
    t = w % T
    h = w // T
    chunk = t // TPC
    req = (t % TPC) * BLOCK_B + tl.arange(0, BLOCK_B)
    lo = tl.load(offsets_ptr + chunk)
    hi = tl.load(offsets_ptr + chunk + 1)
    return h, chunk, req, req < B, lo, hi

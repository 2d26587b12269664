"""Ranking, head classification and per-head page lists: batched tensor functions, no
host sync, shared by the GPU page store (`store.py`) and the engine hook (`engine_hook.py`).

Pages are blocks of `block_size` tokens of one sequence, numbered 0..n_pages-1 (logical).
A page's score for a head is an upper bound of q.k over its keys, from per-page elementwise
key minima and maxima (Quest's bound: sum_d max(q_d kmin_d, q_d kmax_d)), maximized over
the head's G query heads. The summaries are 2 vectors per page and head (1/block_size of
the page's K and V): they stay on the GPU, so ranking never reads an offloaded page.
"""

from __future__ import annotations

import torch


def page_summaries(keys: torch.Tensor, n_tokens: torch.Tensor | None = None):
    """keys [B, P, bs, Hkv, D] -> (kmin, kmax) [B, Hkv, P, D]; tokens at or past
    `n_tokens[b]` ([B], optional) are left out (a page with none: +inf / -inf)."""
    b, p, bs, _, _ = keys.shape
    k = keys.float()
    if n_tokens is not None:
        pos = torch.arange(p * bs, device=keys.device).view(1, p, bs, 1, 1)
        ok = pos < n_tokens.view(b, 1, 1, 1, 1)
        kmin = torch.where(ok, k, float("inf")).amin(2)
        kmax = torch.where(ok, k, float("-inf")).amax(2)
    else:
        kmin, kmax = k.amin(2), k.amax(2)
    return kmin.transpose(1, 2), kmax.transpose(1, 2)


def page_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """q [B, Hq, D], kmin/kmax [B, Hkv, P, D] -> [B, Hkv, P] fp32 upper bounds of q.k."""
    b, hq, d = q.shape
    hkv = kmin.shape[1]
    qf = q.float().view(b, hkv, hq // hkv, d)
    # max(q kmin, q kmax) per dim = q+ kmax + q- kmin: two products, no [.., P, D] temporary
    hi = torch.nan_to_num(kmax.float(), neginf=0.0)
    lo = torch.nan_to_num(kmin.float(), posinf=0.0)
    s = torch.einsum("bhgd,bhpd->bhgp", qf.clamp(min=0), hi)
    s = s + torch.einsum("bhgd,bhpd->bhgp", qf.clamp(max=0), lo)
    return s.amax(2)


def page_mass(
    q: torch.Tensor,  # [B, Hq, D]
    keys: torch.Tensor,  # [B, Hkv, P, bs, D]
    n_tokens: torch.Tensor,  # [B]: keys at or past it are left out
    sm_scale: float,
) -> torch.Tensor:
    """[B, Hkv, P] fp32: each page's share of the softmax attention of the current query,
    summed over the head's G query heads (FlexiCache's ranking by attention mass)."""
    b, hq, d = q.shape
    hkv, p, bs = keys.shape[1], keys.shape[2], keys.shape[3]
    qf = q.float().view(b, hkv, hq // hkv, d)
    s = torch.einsum("bhgd,bhpd->bhgp", qf, keys.float().reshape(b, hkv, p * bs, d)) * sm_scale
    pos = torch.arange(p * bs, device=q.device)
    s = s.masked_fill(pos[None, None, None, :] >= n_tokens.view(b, 1, 1, 1), float("-inf"))
    return torch.softmax(s, -1).view(b, hkv, -1, p, bs).sum((2, 4))


def page_centroids(keys: torch.Tensor, n_tokens: torch.Tensor):
    """keys [B, Hkv, P, bs, D] -> (mean key [B, Hkv, P, D] fp32, tokens per page [B, P]),
    over the tokens before `n_tokens[b]`."""
    b, _, p, bs, _ = keys.shape
    pos = torch.arange(p * bs, device=keys.device).view(1, p, bs)
    ok = (pos < n_tokens.view(b, 1, 1)).float()  # [B, P, bs]
    count = ok.sum(-1)  # [B, P]
    total = torch.einsum("bhptd,bpt->bhpd", keys.float(), ok)
    return total / count.clamp(min=1)[:, None, :, None], count


def centroid_mass(
    q: torch.Tensor,  # [B, Hq, D]
    kmean: torch.Tensor,  # [B, Hkv, P, D]
    count: torch.Tensor,  # [B, P] tokens per page (0: none)
    sm_scale: float,
) -> torch.Tensor:
    """[B, Hkv, P] fp32: attention mass estimated from per-page mean keys (each page as
    `count` copies of its mean key), summed over the head's G query heads. One D-vector per
    page and head, kept on the device: ranking reads no offloaded page."""
    return centroid_mass_biased(q, kmean, count_bias(count), sm_scale)


def count_bias(count: torch.Tensor) -> torch.Tensor:
    """[B, P] fp32: log of each page's token count, -inf for an empty page (the same for
    every layer of a step: `centroid_mass_biased` takes it computed once)."""
    return torch.where(count == 0, float("-inf"), count.clamp(min=1).float().log())


def centroid_mass_biased(
    q: torch.Tensor, kmean: torch.Tensor, bias: torch.Tensor, sm_scale: float
) -> torch.Tensor:
    """`centroid_mass` with the pages' `count_bias` given."""
    b, hq, d = q.shape
    hkv = kmean.shape[1]
    qf = q.float().view(b, hkv, hq // hkv, d)
    s = torch.einsum("bhgd,bhpd->bhgp", qf, kmean.float()) * sm_scale
    return torch.softmax(s + bias[:, None, None, :], -1).sum(2)


def candidates(n_pages: torch.Tensor, recent: int, max_pages: int, sink: int = 0) -> torch.Tensor:
    """[B, P] bool: the pages ranked (full ones outside the sink and recent windows)."""
    pages = torch.arange(max_pages, device=n_pages.device)
    return (pages[None, :] < (n_pages[:, None] - recent)) & (pages[None, :] >= sink)


def rerank(
    scores: torch.Tensor,  # [B, Hkv, P]
    cand: torch.Tensor,  # [B, P] bool
    old_top: torch.Tensor,  # [B, Hkv, K] int64, -1: none yet
    threshold: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top [B, Hkv, K] int64, stable [B, Hkv] bool, overlap [B, Hkv] fp32): the new top-K
    candidate pages, and whether each head's top-K overlaps its previous one by >=
    `threshold` (no previous ranking: overlap 0). Rows with fewer than K candidates get -1
    for the missing picks: the caller keeps such rows whole."""
    k = old_top.shape[-1]
    s = scores.masked_fill(~cand[:, None, :], float("-inf"))
    top = s.topk(min(k, s.shape[-1]), dim=-1).indices
    if top.shape[-1] < k:
        top = torch.cat([top, top[..., :1].expand(*top.shape[:-1], k - top.shape[-1])], -1)
    overlap = (top[..., :, None] == old_top[..., None, :]).any(-1).float().mean(-1)
    # picks among non-candidates (a row with fewer than K) are -1: a kept page is always a
    # candidate, so a page boundary can only add the new page (the store's fast path)
    top = torch.where(s.gather(-1, top) > float("-inf"), top, -1)
    return top, overlap >= threshold, overlap


def keep_mask(
    top: torch.Tensor,  # [B, Hkv, K] int64 (-1: none)
    stable: torch.Tensor,  # [B, Hkv] bool
    active: torch.Tensor,  # [B] bool: rows under FlexiCache (long enough)
    n_pages: torch.Tensor,  # [B] int64
    recent: int,
    max_pages: int,
    sink: int = 0,
) -> torch.Tensor:
    """[B, Hkv, P] bool: the pages each head reads (and keeps on the GPU). A stable head of
    an active row: its top-K, the `sink` first and the `recent` newest pages; any other
    head: every page."""
    return keep_mask_windows(top, stable, active, window_masks(n_pages, recent, max_pages, sink))


def window_masks(
    n_pages: torch.Tensor, recent: int, max_pages: int, sink: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid, window) [B, P] bool: the pages that exist, and those every head keeps (the
    `sink` first and `recent` newest): the same for every layer of a step."""
    pages = torch.arange(max_pages, device=n_pages.device)
    valid = pages[None, :] < n_pages[:, None]  # [B, P]
    recent_m = valid & ((pages[None, :] >= n_pages[:, None] - recent) | (pages[None, :] < sink))
    return valid, recent_m


def keep_mask_windows(
    top: torch.Tensor,  # [B, Hkv, K] int64 (-1: none)
    stable: torch.Tensor,  # [B, Hkv] bool
    active: torch.Tensor,  # [B] bool
    windows: tuple[torch.Tensor, torch.Tensor],  # `window_masks`
) -> torch.Tensor:
    """`keep_mask` with the step's `window_masks` given."""
    b, hkv, _ = top.shape
    valid, recent_m = windows
    max_pages = valid.shape[-1]
    # a pick past this step's pages (ranked in a wider batch, among a short row's arbitrary
    # picks) goes to a dump column
    ok = (top >= 0) & (top < max_pages)
    in_top = torch.zeros(b, hkv, max_pages + 1, dtype=torch.bool, device=top.device)
    in_top.scatter_(-1, torch.where(ok, top, max_pages), True)
    in_top = in_top[..., :max_pages]
    flex = in_top | recent_m[:, None, :]
    whole = ~(stable & active[:, None])
    return valid[:, None, :] & (whole[..., None] | flex)


def head_lists(
    keep: torch.Tensor,  # [B, Hkv, P] bool (the newest valid page always kept)
    page_map: torch.Tensor,  # [B, P] or [B, Hkv, P] int: where each logical page lives
    seq_lens: torch.Tensor,  # [B] int
    block_size: int,
    pad: torch.Tensor | None = None,  # [B]: `last_page_pad(seq_lens, block_size)` if known
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tables [B, Hkv, P] int32, lens [B, Hkv] int32) for `paged_decode_heads`: each head's
    kept pages in ascending order (the partial newest page last) and its token count."""
    b, hkv, p = keep.shape
    pages = torch.arange(p, device=keep.device)
    order = torch.where(keep, pages, p).sort(-1).values.clamp(max=p - 1)
    if page_map.dim() == 2:
        page_map = page_map[:, None, :].expand(b, hkv, p)
    tables = page_map.gather(-1, order).to(torch.int32)
    pad = last_page_pad(seq_lens, block_size) if pad is None else pad
    lens = keep.sum(-1) * block_size - pad[:, None]
    return tables.contiguous(), lens.to(torch.int32).contiguous()


def last_page_pad(seq_lens: torch.Tensor, block_size: int) -> torch.Tensor:
    """[B]: the unused token slots of each sequence's newest page."""
    return (seq_lens + block_size - 1) // block_size * block_size - seq_lens

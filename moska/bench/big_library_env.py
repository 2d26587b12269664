"""Pieces of `moska.bench.big_library`: the model dims, what the run measures of the machine
(host memory, the scratch disk's file system and bytes, dropping the page cache of a
library's files so that the disk tier's first reads reach the device) and the summary."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from moska.bench.common import LLAMA_3_1_8B

LLAMA_3_2_1B = {
    **LLAMA_3_1_8B,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "tie_word_embeddings": True,
}


def dims_config(dims: str, dry_run: bool) -> tuple[dict, torch.dtype, str]:
    """(HF config, dtype, device): Llama dims in bf16 on CUDA, or the tiny model on CPU."""
    if dry_run:
        from moska.model.default import CONFIG

        return dict(CONFIG, num_hidden_layers=2), torch.float32, "cpu"
    return dict(LLAMA_3_2_1B if dims == "1b" else LLAMA_3_1_8B), torch.bfloat16, "cuda"


def host_memory() -> dict:
    """This process's resident memory now and at its peak (GiB), and the machine's free."""
    out: dict = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[f"cpu_{'rss' if key == 'VmRSS' else 'rss_peak'}_gib"] = (
                    int(value.split()[0]) / 2**20
                )
        pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        out["cpu_available_gib"] = pages / 2**30
    except (OSError, ValueError):
        pass
    return out


def filesystem_of(path: Path) -> str:
    """The file system type of the mount holding `path` (tmpfs would make "disk" RAM)."""
    best, kind = "", "unknown"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            mount = parts[1]
            inside = str(path.resolve()).startswith(mount.rstrip("/") + "/")
            if len(parts) > 2 and (inside or mount == "/") and len(mount) > len(best):
                best, kind = mount, parts[2]
    except OSError:
        pass
    return f"{kind} at {best}"


def disk_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


def drop_page_cache(directory: Path) -> int:
    """Ask the kernel to drop the cached pages of every file in `directory` (they were
    written durably, so they are clean); returns how many files were asked. Reads after
    this reach the device until the pages are cached again (the tier reads through the page
    cache: later reads of the same rows may be served from RAM)."""
    n = 0
    for p in sorted(directory.iterdir()):
        if not p.is_file():
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            n += 1
        finally:
            os.close(fd)
    return n


def describe(a, cfg: dict, head_dim: int, dtype, tokens: int, per_token: int) -> dict:
    """The shapes block of the JSON."""
    keys = ("num_hidden_layers", "num_key_value_heads", "num_attention_heads", "hidden_size")
    return {
        "dims": "tiny" if a.cpu_dry_run else a.dims,
        "model": {k: cfg[k] for k in keys},
        "head_dim": head_dim,
        "dtype": str(dtype).removeprefix("torch."),
        "library_tokens": tokens,
        "library_kv_gib": tokens * per_token / 2**30,
        "chunk_size": a.chunk_size,
        "num_chunks": -(-tokens // a.chunk_size),
        "top_k": a.top_k,
        "requests": a.requests,
        "unique_tokens": a.unique_tokens,
        "max_tokens": a.max_tokens,
        "skew": a.skew,
    }


def summarize(rows: list[dict]) -> dict:
    """Per placement (and miss policy): the first run's output tokens/s, TTFT p50/p99,
    TPOT p50, the ratio to the resident library, tier hit rates and peak memory."""
    out: dict = {}
    base = None
    for row in rows:
        key = row["placement"] + (f"-{row['miss_policy']}" if row.get("miss_policy") else "")
        if row.get("status") != "ok" or not row.get("runs"):
            out[key] = {"status": row.get("status"), "reason": row.get("reason")}
            continue
        run = row["runs"][0]
        tps = run["output_tokens_per_s"]
        if row["placement"] == "resident":
            base = tps
        fig = {
            "arrivals": run["arrivals"],
            "output_tokens_per_s": tps,
            "ttft_p50_s": run["ttft_p50_s"],
            "ttft_p99_s": run["ttft_p99_s"],
            "tpot_p50_s": run["tpot_p50_s"],
            "ratio_vs_resident": tps / base if base and tps else None,
            "gpu_peak_gib": row.get("gpu_peak_gib"),
            "cpu_rss_peak_gib": row.get("cpu_rss_peak_gib"),
        }
        tiers = run.get("tiers")
        if tiers:
            fig["gpu_hit_rate"] = tiers["gpu"]["hit_rate"]
            fig["cpu_hit_rate"] = tiers["cpu"]["hit_rate"]
            fig["skipped_selections"] = tiers["skipped"]
        out[key] = fig
    return out

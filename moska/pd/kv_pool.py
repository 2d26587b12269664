"""A host-memory KV pool shared by the instances of one host, addressed by block hash.

Each entry is one full KV block of every layer (`[L, 2, block_size, Hkv, D]`) in a file of
a shared-memory directory (/dev/shm by default: host RAM that every process on the host
maps; a disk directory works the same, as a slower tier). The name is the block's stable
chained hash (`pd/index.block_hashes`: it covers the block's tokens, everything in front of
it and the namespace), so any instance finds a prefix another one computed. The file holds
a header (magic, a BLAKE2b digest of the payload, shape, dtype) and the payload; a fetch
recomputes the digest and treats a mismatch, a short file or another layout as a miss (the
file is removed, the block is recomputed): a bad block is never used.

Writes are atomic (a temporary file renamed into place); the pool keeps at most
`capacity_blocks` entries, the oldest files leaving first: to the disk tier when one is
configured (`disk_root`, `--kv-pool-disk-dir`: a directory on disk that keeps
`disk_capacity_blocks` more, oldest dropped), else dropped. A fetch looks in host memory,
then on disk (the same check; a block found on disk moves back to host memory). Instances
write the blocks of every prompt they prefill (write-through, not on eviction: the
engine's allocator is not hooked) and, before running a prompt, take the leading blocks
they lack from the pool.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path

import torch

MAGIC = b"MKVP"
_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16)}


class KVPool:
    def __init__(
        self, root: str | Path, capacity_blocks: int = 4096, disk_root: str | Path | None = None,
        disk_capacity_blocks: int = 65536,
    ) -> None:  # fmt: skip
        if capacity_blocks < 1 or disk_capacity_blocks < 1:
            raise ValueError("the KV pool needs room for at least one block in each tier")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.capacity_blocks = capacity_blocks
        self.disk = None if disk_root is None else KVPool(disk_root, disk_capacity_blocks)
        self.hits = self.misses = self.corrupt = 0

    def _path(self, block_hash: int) -> Path:
        return self.root / f"{block_hash:016x}.kv"

    def __contains__(self, block_hash: int) -> bool:
        return self._path(block_hash).exists() or (
            self.disk is not None and block_hash in self.disk
        )

    def put(self, block_hash: int, kv: torch.Tensor) -> None:
        """Store one block (`[L, 2, bs, Hkv, D]`) unless it is there already."""
        path = self._path(block_hash)
        if block_hash in self:
            return
        payload = kv.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
        head = json.dumps({"shape": list(kv.shape), "dtype": str(kv.dtype)}).encode()
        digest = hashlib.blake2b(payload, digest_size=16).digest()
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(MAGIC + digest + struct.pack("<I", len(head)) + head + payload)
        os.replace(tmp, path)
        self._trim()

    def get(self, block_hash: int, shape: tuple[int, ...], dtype: torch.dtype):
        """The block, or None when it is absent or fails its check (then it is removed)."""
        path = self._path(block_hash)
        try:
            data = path.read_bytes()
        except OSError:
            disk = self.disk
            kv = None if disk is None else disk.get(block_hash, shape, dtype)
            if disk is None or kv is None:
                self.misses += 1
                return None
            self.hits += 1
            disk._path(block_hash).unlink(missing_ok=True)
            self.put(block_hash, kv)  # back to host memory (the next fetch is fast)
            return kv
        try:
            if data[:4] != MAGIC:
                raise ValueError("magic")
            digest, (n,) = data[4:20], struct.unpack("<I", data[20:24])
            head = json.loads(data[24 : 24 + n])
            payload = data[24 + n :]
            if hashlib.blake2b(payload, digest_size=16).digest() != digest:
                raise ValueError("checksum")
            if tuple(head["shape"]) != tuple(shape) or _DTYPES[head["dtype"]] != dtype:
                raise ValueError("layout")
            t = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
            kv = t.view(dtype).view(shape)
        except (ValueError, KeyError, struct.error):
            self.corrupt += 1
            path.unlink(missing_ok=True)  # recomputed next time, never used
            return None
        self.hits += 1
        return kv

    def _trim(self) -> None:
        files = list(self.root.glob("*.kv"))
        if len(files) <= self.capacity_blocks:
            return
        files.sort(key=lambda p: p.stat().st_mtime)
        for p in files[: len(files) - self.capacity_blocks]:
            if self.disk is None:
                p.unlink(missing_ok=True)
                continue
            try:  # to the disk tier: a file copied whole under a temporary name, renamed
                fd, tmp = tempfile.mkstemp(dir=self.disk.root, suffix=".tmp")
                with os.fdopen(fd, "wb") as fh:
                    fh.write(p.read_bytes())
                os.replace(tmp, self.disk.root / p.name)
            except OSError:  # gone meanwhile (another instance trimmed it)
                pass
            p.unlink(missing_ok=True)
        if self.disk is not None:
            self.disk._trim()

"""Bodies of the library management API (`/v1/libraries`, pydantic): build requests,
library objects (with their damaged status), build jobs and deletions."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from moska.server.protocol import LibraryName, RequestBody


class LibraryDocument(RequestBody):
    name: str = Field(min_length=1, max_length=256)
    text: str = Field(min_length=1)


class LibraryBuildRequest(RequestBody):
    name: LibraryName
    documents: list[LibraryDocument] = Field(min_length=1, max_length=100_000)
    chunk_size: int | None = Field(
        None,
        ge=1,
        le=1 << 20,
        description="tokens per chunk, the unit the router picks (default: a power of two "
        "giving about 32 chunks, 64 to 4096)",
    )
    mode: Literal["prefix", "independent"] = "prefix"
    kv_dtype: Literal["auto", "fp8", "fp8_rotated"] = Field(
        "auto",
        description="library KV: auto = the model's dtype; fp8 = e4m3 with per-(token, KV "
        "head) scales; fp8_rotated = e4m3 with K Hadamard-rotated and K, V scales per "
        "128-row block, q rotated when read (faster on FP8 tensor cores; a power-of-two "
        "head_dim)",
    )
    routing_rank: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="rank of the key-max routing index, at most the model's head_dim "
        "(default: head_dim / 4; docs/routing.md)",
    )
    repair_tokens: int | None = Field(
        None,
        ge=0,
        le=1 << 20,
        description="independent mode, boundary repair: recompute the first this many tokens "
        "of every chunk that continues a document after the chunk before it (with "
        "repair_layers; default none; library/boundary_repair.py)",
    )
    repair_layers: int | None = Field(
        None,
        ge=0,
        le=1 << 16,
        description="boundary repair: in the first this many KV layers, at most the model's",
    )


class LibraryObject(BaseModel):
    model_config = ConfigDict(extra="allow")

    object: Literal["library"] = "library"
    name: str
    num_tokens: int | None = None
    num_chunks: int | None = None
    chunk_size: int | None = None
    mode: str | None = None
    model: str | None = None
    created: Any = None
    status: Literal["ok", "damaged", "corrupt"] = Field(
        "ok",
        description='"damaged" when a file of the library is missing or unreadable; "corrupt" '
        "when a load found a file whose checksum differs (rebuild it)",
    )
    reason: str | None = Field(None, description="why the library is damaged or corrupt")


class LibraryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[LibraryObject]


class LibraryJob(BaseModel):
    """A library build. `prefilled_tokens` of `total_tokens` (None until the documents are
    tokenized) say how far its prefill is."""

    id: str
    object: Literal["library.job"] = "library.job"
    name: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    created: int
    finished: int | None = None
    error: str | None = None
    library: LibraryObject | None = None
    prefilled_tokens: int = 0
    total_tokens: int | None = None


class LibraryDeleted(BaseModel):
    object: Literal["library.deleted"] = "library.deleted"
    name: str
    deleted: bool = True

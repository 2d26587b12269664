"""Where a prefill/decode transfer group meets and one instance's place in it: the
`--pd-master`, `--pd-rank`, `--pd-world` and `--pd-transport` flags, validated. Plain
Python (no torch), so the CLI can build and check it before any model loads; the group
itself is `transport.KVTransport`."""

from __future__ import annotations

from dataclasses import dataclass

TRANSPORTS = ("auto", "gloo", "shm", "cuda_ipc")  # --pd-transport (transport.py's module doc)


@dataclass(frozen=True)
class TransferEndpoint:
    """Where the transfer group meets and this instance's place in it."""

    host: str
    port: int
    rank: int
    world_size: int
    timeout_s: float = 10.0
    transport: str = "auto"  # --pd-transport: how KV goes to a decode rank

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"--pd-rank {self.rank} must be in [0, --pd-world {self.world_size})")
        if self.timeout_s <= 0:
            raise ValueError("the transfer timeout must be positive")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"--pd-transport must be one of {', '.join(TRANSPORTS)}")

    @classmethod
    def parse(
        cls, master: str, rank: int, world_size: int, timeout_s: float = 10.0,
        transport: str = "auto",
    ) -> TransferEndpoint:  # fmt: skip
        host, _, port = master.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--pd-master must be HOST:PORT, got {master!r}")
        return cls(host, int(port), rank, world_size, timeout_s, transport)

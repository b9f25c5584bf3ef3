"""The agent's one configuration object, built by the CLI and passed down."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 10001


class ConfigError(ValueError):
    """A setting the user gave that cannot work; the message says how to fix it."""


@dataclass(frozen=True)
class Listen:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT

    @classmethod
    def parse(cls, text: str) -> "Listen":
        """``HOST:PORT``, ``:PORT``, ``PORT`` or ``[v6]:PORT``."""
        host, sep, port = text.rpartition(":")
        if not sep:
            host, port = DEFAULT_HOST, text
        host = host.strip("[]") or DEFAULT_HOST
        try:
            number = int(port)
        except ValueError:
            raise ConfigError(f"--listen {text!r}: port {port!r} is not a number") from None
        if not 0 <= number <= 65535:
            raise ConfigError(f"--listen {text!r}: port must be 0-65535")
        return cls(host, number)

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


@dataclass(frozen=True)
class Config:
    listen: Listen = field(default_factory=Listen)
    output: Path | None = None
    log_level: str = "info"
    # Broadcast: events each SSE client may lag behind before it is told it missed some.
    client_queue_size: int = 4096
    # Recent events kept for REST queries and for clients that connect later.
    history_size: int = 10_000
    keepalive_seconds: float = 15.0
    # Capture
    max_body_bytes: int = 1 << 20
    stream_limit_seconds: float = 10.0
    ring_mib: int = 32
    max_chunk_bytes: int = 16384
    capture_own_port: bool = False
    attach_mode: str = "auto"  # "auto" (tuned where provable) or "entry"
    cpu_priority: str = "auto"  # priority.MODES: see priority.py
    shed: bool = True  # when behind, keep message heads and cut bodies (else: lose records)
    # Plaintext taken in per second before shedding the same way (capture/budget.py); 0: no limit.
    # 32 MiB/s streams as ~57 MB/s of SSE (bodies are base64 twice), more than a browser
    # tab or jq can follow, and holds the agent near a fifth of a core under a flood of
    # megabyte responses (W2 in `make bench`: a third of a core at 64).
    max_capture_mib_per_s: float = 32.0
    # Enrichment
    docker: bool = True
    docker_url: str | None = None
    kube_api: str | None = None
    node_name: str | None = None
    # Replay
    replay_speed: float = 0.0
    replay_max_gap: float = 5.0  # seconds of silence between two events, at most, when paced
    cache_dir: Path | None = None

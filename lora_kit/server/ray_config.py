"""The settings of ``lora-kit serve --replicas N``: engine replicas on Ray Serve (see :mod:`.ray_app`).

Kept apart from the Ray code so the CLI derives its flags without importing Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class ReplicaConfig:
    """How the engine is scaled out on Ray Serve (one docstring per field: the flag's help)."""

    replicas: int = 0
    """Engine replicas on Ray Serve, each serving the HTTP API behind Ray's proxy (0: one process, no Ray). Each replica loads the base once and serves every adapter; a request goes to a replica that holds its adapter (README: Serving beyond one process)."""

    replica_cpus: float = field(default=1.0, metadata={"metavar": "X"})
    """CPUs Ray reserves per engine replica; its torch threads are set to match (at least 1)."""

    replica_gpus: float = field(default=0.0, metadata={"metavar": "G"})
    """GPUs per engine replica (1 on a GPU node: each replica then runs on its own GPU)."""

    ray_address: str | None = field(default=None, metadata={"metavar": "ADDR"})
    """Ray cluster to join: 'auto' (the cluster `ray start` made on this node) or HOST:PORT; default: start a local Ray."""

    stream_interval_ms: float = field(default=50.0, metadata={"metavar": "MS"})
    """A replica running a relayed request sends its stream's first token at once, then the tokens ready every this many milliseconds as one event (one Ray object, the same text); 0: every token alone."""

    proxy_location: Literal["EveryNode", "HeadOnly"] = "EveryNode"
    """Where Ray Serve runs its HTTP proxies: EveryNode (each node with a replica; a load balancer in front of the nodes) or HeadOnly (one address; also for several Ray nodes on one host, whose proxies would share a port)."""

    def __post_init__(self) -> None:
        if self.stream_interval_ms < 0:
            raise ValueError("--stream-interval-ms must be >= 0")
        if self.replicas < 0:
            raise ValueError("--replicas must be >= 0")
        if self.replica_cpus <= 0 or self.replica_gpus < 0:
            raise ValueError("--replica-cpus must be > 0 and --replica-gpus >= 0")

    @classmethod
    def add_cli_args(cls, parser: Any) -> None:
        """A flag per field (``--replicas``, ``--replica-cpus``, ...), derived as EngineConfig's are."""
        from lora_kit.config_cli import add_dataclass_args

        add_dataclass_args(parser, cls)

    @classmethod
    def from_cli_args(cls, args: Any) -> ReplicaConfig:
        from lora_kit.config_cli import dataclass_from_args

        return dataclass_from_args(cls, args)

    @property
    def threads(self) -> int:
        """Torch threads of one replica: its CPUs, at least one."""
        return max(1, int(self.replica_cpus))

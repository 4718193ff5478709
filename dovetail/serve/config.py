"""ServeConfig: everything a Dovetail deployment needs, from the CLI, a YAML's ``args`` or code.

The engine fields mirror ``EngineConfig``; the serving fields say where to listen, how many
replicas (each a complete engine on its own share of the machine's sockets) and how long the
fair queue in front of each engine may grow.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dovetail.config import EngineConfig, parse_tree
from dovetail.errors import UserError
from dovetail.store import AUTO_DRAFT, DEFAULT_TARGET


class Autoscaling(BaseModel):
    """Ray Serve autoscaling bounds (replicas are added when queues grow past the target)."""

    model_config = ConfigDict(extra="forbid")
    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(4.0, gt=0)

    @model_validator(mode="after")
    def _bounds(self):
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be >= min_replicas")
        return self


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # the engine (see EngineConfig / `launch.py generate --help`)
    target: str = DEFAULT_TARGET
    draft: str | None = AUTO_DRAFT  # None: target-only
    tree: str | None = None
    target_precision: str = "auto"  # native | int8 | int4 | fp32 (auto: native for packaged models)
    draft_precision: str = "auto"
    draft_vocab: int = 0
    target_kernel: str = "mm"
    sockets: str | None = None
    shards: int | None = None  # per replica (default: one per socket of its share)
    pipeline: bool = True
    collective: str = "shm"
    draft_cpus: str = "auto"
    kv_memory_mb: int | None = Field(None, ge=1)  # per replica (default: its share of the RAM the plan leaves free)
    # serving
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = Field(8000, ge=1, le=65535)
    served_model_name: str | None = None  # default: the target's name
    replicas: int = Field(1, ge=1)
    autoscaling: Autoscaling | None = None  # overrides replicas
    max_batch: int = Field(4, ge=1)  # per replica: requests decoding together (trees verified in one forward)
    max_queued_requests: int = Field(64, ge=1)  # per replica; more get a 429
    address: str | None = None  # join this Ray cluster (launch.py serve)
    api_key: str | None = Field(None, min_length=1)  # /v1/* then needs "Authorization: Bearer <key>"
    max_body_bytes: int = Field(4 << 20, ge=1024)  # larger request bodies get a 413 before they are read

    @classmethod
    def parse(cls, data: dict) -> "ServeConfig":
        """Validate ``data`` (CLI or YAML args) into a config; ``UserError`` names every bad field."""
        try:
            config = cls(**data)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
            raise UserError(f"bad serve config: {problems}") from None
        config.engine_config()  # the engine fields' own checks
        return config

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.target).name

    @property
    def replica_slots(self) -> int:
        """How many shares the machine is cut into: one per replica there can be at once."""
        return self.autoscaling.max_replicas if self.autoscaling else self.replicas

    def engine_config(self, partition: tuple[int, int] = (0, 1)) -> EngineConfig:
        kwargs = dict(target=self.target, draft=self.draft, draft_precision=self.draft_precision,
                      target_precision=self.target_precision,
                      draft_vocab=self.draft_vocab, target_kernel=self.target_kernel, engine="actors",
                      sockets=self.sockets, shards=self.shards, pipeline=self.pipeline, address=self.address,
                      collective=self.collective, draft_cpus=self.draft_cpus, partition=partition,
                      max_batch=self.max_batch, kv_memory_mb=self.kv_memory_mb)
        if self.tree:
            kwargs["tree"] = parse_tree(self.tree)
        return EngineConfig(**kwargs)

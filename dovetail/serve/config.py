"""ServeConfig: everything a Dovetail deployment needs, from the CLI, a YAML's ``args`` or code.

The engine is an ``EngineConfig`` (the one source of engine options); the serving fields say
where to listen, how many replicas (each a complete engine on its own share of the machine's
sockets) and how long the fair queue in front of each engine may grow.
"""

from __future__ import annotations

from dataclasses import asdict, fields

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dovetail.config import EngineConfig
from dovetail.errors import UserError
from dovetail.store import model_name


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
    """``engine`` (an ``EngineConfig``) plus the serving fields. The engine's fields may also be
    given flat, beside the serving ones, as a YAML's ``args`` does."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    engine: EngineConfig = Field(default_factory=lambda: EngineConfig(engine="actors"))
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = Field(8000, ge=1, le=65535)
    served_model_name: str | None = None  # default: the target's name
    replicas: int = Field(1, ge=1)
    autoscaling: Autoscaling | None = None  # overrides replicas
    max_queued_requests: int = Field(64, ge=1)  # per replica; more get a 429
    api_key: str | None = Field(None, min_length=1)  # /v1/* then needs "Authorization: Bearer <key>"
    max_body_bytes: int = Field(4 << 20, ge=1024)  # larger request bodies get a 413 before they are read
    # replicas sharing one node (its sockets cut into that many parts); default: the replicas
    # spread over the cluster's nodes (all of them on a single machine)
    replicas_per_node: int | None = Field(None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _engine_fields(cls, data):
        """Gather the engine's fields (flat, or an ``engine`` mapping) into one ``EngineConfig``
        running the actor engine; its own checks become this model's errors."""
        if not isinstance(data, dict):
            return data
        data, names = dict(data), {f.name for f in fields(EngineConfig)}
        given = data.pop("engine", None)
        if isinstance(given, str):  # the flat "engine" field: serve runs the actor engine only
            if given not in ("actors", "auto"):
                raise ValueError(f"serve runs the actor engine, not {given!r}")
            given = None
        values = asdict(given) if isinstance(given, EngineConfig) else dict(given or {})
        values.update({k: data.pop(k) for k in list(data) if k in names})
        try:
            data["engine"] = EngineConfig(**{**values, "engine": "actors"})
        except (UserError, TypeError) as exc:
            raise ValueError(str(exc)) from None
        return data

    @classmethod
    def parse(cls, data: dict) -> "ServeConfig":
        """Validate ``data`` (CLI or YAML args) into a config; ``UserError`` names every bad field."""
        try:
            return cls(**data)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
            raise UserError(f"bad serve config: {problems}") from None

    @property
    def model_name(self) -> str:
        return self.served_model_name or model_name(self.engine.target)

    @property
    def replica_slots(self) -> int:
        """How many replicas there can be at once."""
        return self.autoscaling.max_replicas if self.autoscaling else self.replicas

    def node_slots(self, nodes: int = 1) -> int:
        """How many shares each node is cut into: its replicas when they spread over ``nodes``."""
        return self.replicas_per_node or max(1, -(-self.replica_slots // max(nodes, 1)))

    def to_args(self) -> dict:
        """The flat form ``parse`` reads back (what a replica receives)."""
        out = self.model_dump(exclude={"engine"})
        out.update(asdict(self.engine))
        return out

"""Configuration of the Serve application: the `args:` of `serve.app:build_app`.

A Serve config YAML (deploy/) or `bsbr-serve up` fills this in; everything
has a default so `build_app({})` serves whatever is in `models/`.

```yaml
applications:
  - name: bsbr
    import_path: serve.app:build_app
    args:
      models:
        - {name: bsbr, path: models/bsbr, num_replicas: 2}
        - {name: standard, path: models/standard, max_tokens: 32768,
           ray_actor_options: {num_cpus: 1, num_gpus: 0.5}}
      sessions: {ttl_s: 900, max_sessions: 10000, max_store_bytes: 4294967296}
      http: {max_body_bytes: 16777216}
    deployments:          # Serve's own overrides, by deployment name
      - {name: bsbr, num_replicas: 4}
```
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The standard transformer's KV cache grows with the document and its
# attention is quadratic, so it gets a lower default limit (docs/architecture.md 3.3).
DEFAULT_MAX_TOKENS = 1_048_576
DEFAULT_MAX_TOKENS_STANDARD = 32_768
DEFAULT_PAGE_TOKENS = 512

# Names a model deployment may not take: the ingress is called `api`.
RESERVED_NAMES = {"api"}


def repo_models_dir() -> Path:
    """`models/` of the source tree this package runs from (editable install or
    checkout), else `./models`."""
    here = Path(__file__).resolve().parent.parent / "models"
    return here if here.is_dir() else Path.cwd() / "models"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    """One served model = one Serve deployment named `name`."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")
    path: str = Field(description="directory written by bsbr_core.save_model")
    backend: Literal["torch", "onnx"] = "torch"
    max_tokens: int | None = Field(
        default=None, ge=1,
        description="most tokens per document; default 32768 for the standard arch, 1048576 otherwise",
    )
    page_tokens: int = Field(default=DEFAULT_PAGE_TOKENS, ge=1, description="page size for text without form feeds")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_batch_size: int = Field(default=16, ge=1, description="most concurrent page steps run as one batch")
    batch_wait_ms: float = Field(default=2.0, ge=0, description="how long a lone step waits for company")
    oneshot_segment_tokens: int = Field(
        default=4096, ge=1,
        description="a one-shot classify reads its document in steps of this many tokens, not page by page")
    torch_threads: int | None = Field(default=None, ge=1, description="torch intra-op threads; default from num_cpus")
    oneshot_torch_threads: int | None = Field(
        default=None, ge=1,
        description="torch intra-op threads of a one-shot classify's steps (default: torch_threads; torch "
                    "backend only): on CPU, replicas of one thread each can read a lone long one-shot document "
                    "with every core, at a cost in throughput under load (docs/architecture.md 3.9)")
    # Serve deployment options (a Serve config YAML's `deployments:` can override them too).
    num_replicas: int | Literal["auto"] | None = 1
    autoscaling_config: dict[str, Any] | None = None
    ray_actor_options: dict[str, Any] = Field(default_factory=lambda: {"num_cpus": 1})
    max_ongoing_requests: int = Field(default=32, ge=1)
    max_queued_requests: int = Field(default=256, ge=-1, description="-1: unbounded; beyond it: 429")
    session_routing: bool = Field(default=True, description="route a session's pages to the replica holding it")

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, v: str) -> str:
        if v in RESERVED_NAMES:
            raise ValueError(f"model name {v!r} is reserved")
        return v

    @model_validator(mode="after")
    def _replicas_or_autoscaling(self) -> ModelSpec:
        if self.autoscaling_config is not None and isinstance(self.num_replicas, int):
            # Serve rejects both at once; autoscaling wins when given.
            self.num_replicas = None
        return self

    def resolved_max_tokens(self, arch: str) -> int:
        if self.max_tokens is not None:
            return self.max_tokens
        return DEFAULT_MAX_TOKENS_STANDARD if arch == "standard" else DEFAULT_MAX_TOKENS


class SessionConfig(_Strict):
    ttl_s: float = Field(default=900.0, gt=0, description="idle time after which a session expires")
    max_sessions: int = Field(default=10_000, ge=1, description="live sessions over all models; beyond: 429")
    max_store_bytes: int = Field(default=4 << 30, ge=1, description="checkpointed state bytes; beyond: 429")
    store: Literal["ray_actor", "memory", "redis"] = Field(
        default="ray_actor",
        description="ray_actor: a named detached actor every replica reaches; "
        "memory: per-replica only (one replica, tests); redis: Redis >= 7 or Valkey at redis_url, "
        "so sessions outlive every Ray process",
    )
    store_channel: Literal["socket", "ray"] = Field(
        default="socket",
        description="with ray_actor, how replicas reach the store actor: socket: a TCP connection to it "
        "(its node's address, a port of the kernel's choosing, a token learned over Ray; a commit's round trip "
        "about 8x shorter than a Ray call's), falling back to Ray calls when it cannot be opened; ray: Ray calls only",
    )
    store_name: str = Field(default="bsbr_session_store", pattern=r"^[A-Za-z0-9_.:-]{1,64}$",
                            description="the store actor's name; with redis, the prefix of its keys")
    redis_url: str | None = Field(
        default=None, pattern=r"^(redis|rediss|unix)://",
        description="with store redis: redis://[:PASSWORD@]HOST:PORT/DB; ${NAME} is replaced by the replica's "
        "environment variable NAME (keeps a password out of the config)",
    )
    redis_timeout_s: float = Field(default=2.0, gt=0,
                                   description="Redis connect and reply timeout; beyond: 503 store_unavailable")
    hot_max_bytes: int = Field(default=1 << 30, ge=0, description="hot states kept per replica (LRU)")
    results_retained: int = Field(default=64, ge=1, description="answers kept per session for seq repeats")

    @model_validator(mode="after")
    def _redis_needs_an_address(self) -> SessionConfig:
        if self.store == "redis" and not self.redis_url:
            raise ValueError("sessions.store redis needs sessions.redis_url (redis://HOST:PORT/DB)")
        return self


class HttpConfig(_Strict):
    max_body_bytes: int = Field(default=16 << 20, ge=1, description="largest request body; beyond: 413")
    max_line_bytes: int = Field(default=4 << 20, ge=1, description="largest NDJSON line of /v1/classify/stream")
    ready_timeout_s: float = Field(default=5.0, gt=0)
    retry_s: float = Field(default=30.0, ge=0, description="how long a request is retried while replicas die/restart")
    replica_timeout_s: float = Field(
        default=5.0, gt=0,
        description="how long a request waits for a model replica to take it (none running, or every one "
                    "busy that long); beyond: 503 unavailable with Retry-After")
    # PDF bodies (docs/architecture.md 3.6): their text is extracted in worker
    # processes of the ingress, each document bounded by these.
    max_pdf_pages: int = Field(default=5000, ge=1, description="most pages of a PDF body; beyond: 413 too_many_pages")
    pdf_timeout_s: float = Field(default=60.0, gt=0,
                                 description="deadline of one PDF's text extraction; beyond: 422 invalid_pdf")
    pdf_memory_bytes: int = Field(default=1 << 30, ge=128 << 20,
                                  description="memory limit (address space) of a PDF worker process")
    pdf_workers: int = Field(default=2, ge=1, description="PDF worker processes per ingress replica")
    pdf_max_queued: int = Field(default=16, ge=0, description="PDFs waiting for a worker; beyond: 429 overloaded")


class IngressConfig(_Strict):
    num_replicas: int = 1
    ray_actor_options: dict[str, Any] = Field(default_factory=lambda: {"num_cpus": 0.5})
    max_ongoing_requests: int = 256


class AppConfig(_Strict):
    models: list[ModelSpec] = Field(default_factory=list, description="empty: every model under models_dir")
    models_dir: str | None = Field(default=None, description="where to look when `models` is empty")
    sessions: SessionConfig = Field(default_factory=SessionConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    ingress: IngressConfig = Field(default_factory=IngressConfig)
    topology: Literal["split", "fused"] = Field(
        default="split",
        description="split: an ingress deployment plus one deployment per model; "
                    "fused: one deployment whose replicas serve HTTP and hold every model")

    @model_validator(mode="after")
    def _unique_names(self) -> AppConfig:
        names = [m.name for m in self.models]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate model names: {sorted(dup)}")
        return self

    def with_discovered_models(self) -> AppConfig:
        """Fill an empty `models` from the model directories under models_dir."""
        if self.models:
            return self
        root = Path(self.models_dir) if self.models_dir else repo_models_dir()
        found = discover_models(root)
        if not found:
            raise FileNotFoundError(missing_models_message(root))
        return self.model_copy(update={"models": found})


def discover_models(root: Path) -> list[ModelSpec]:
    """One ModelSpec per `root/<name>/config.json`, bsbr first then standard."""
    if not root.is_dir():
        return []
    specs = []
    for d in sorted(root.iterdir()):
        if (d / "config.json").is_file() and (d / "model.safetensors").is_file():
            name = d.name.lower()
            if name in RESERVED_NAMES:
                continue
            specs.append(ModelSpec(name=name, path=str(d.resolve())))
    order = {"bsbr": 0, "standard": 1}
    return sorted(specs, key=lambda s: (order.get(s.name, 2), s.name))


def missing_models_message(root: Path) -> str:
    # One line: `bsbr-serve up` prints it as its whole answer.
    where = f"{root}" if root.is_dir() else f"{root} (no such directory)"
    return (
        f"no models found under {where}: each model is a directory with config.json, model.safetensors "
        f"and tokenizer.json; make untrained ones for development with `bsbr-serve init-models --random "
        f"--dir {root}`, train real ones (README: bsbr-serve train), or pass --models-dir"
    )


MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def check_model_dirs(cfg: AppConfig) -> None:
    """Fail before Ray or any replica starts when a model directory is incomplete."""
    for spec in cfg.models:
        p = Path(spec.path)
        missing = [f for f in MODEL_FILES if not (p / f).is_file()]
        if missing:
            raise FileNotFoundError(f"model {spec.name!r}: {p} lacks {', '.join(missing)}")


def is_trained(path: str | Path) -> bool:
    """False for `init-models --random` models (metrics.json says so) and for
    checkpoints with no training record at all."""
    card = model_card(path)
    if "trained" in card:
        return bool(card["trained"])
    p = Path(path)
    return (p / "metrics.json").is_file() or (p / "training.json").is_file()


def model_card(path: str | Path) -> dict[str, Any]:
    """What `models/<name>/metrics.json` says about training (empty if absent)."""
    f = Path(path) / "metrics.json"
    if not f.is_file():
        return {}
    try:
        d = json.loads(f.read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}

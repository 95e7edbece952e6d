"""The Serve application builder: `import_path: serve.app:build_app`.

Deployments: the ingress `api` and one per model, named by the model
(`bsbr`, `standard`, ...), each with its own replicas / autoscaling /
ray_actor_options (num_gpus included), so a Serve config YAML's
`deployments:` overrides address them by those names.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.serve import Application

from serve.api import Api
from serve.config import AppConfig, ModelSpec, check_model_dirs
from serve.deployments import ModelServer
from serve.router import ROUTER_PATH


def model_deployment_options(spec: ModelSpec) -> dict[str, Any]:
    from ray.serve.config import RequestRouterConfig

    opts: dict[str, Any] = {
        "name": spec.name,
        "ray_actor_options": dict(spec.ray_actor_options),
        "max_ongoing_requests": spec.max_ongoing_requests,
        "max_queued_requests": spec.max_queued_requests,
    }
    if spec.autoscaling_config is not None:
        opts["autoscaling_config"] = spec.autoscaling_config
    elif spec.num_replicas is not None:
        opts["num_replicas"] = spec.num_replicas
    if spec.session_routing:
        opts["request_router_config"] = RequestRouterConfig(request_router_class=ROUTER_PATH)
    return opts


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Build the application from `args` (validated as serve.config.AppConfig)."""
    cfg = AppConfig.model_validate(args or {}).with_discovered_models()
    # Relative paths are resolved here, where the config was written.
    cfg = cfg.model_copy(update={"models": [
        m.model_copy(update={"path": str(Path(m.path).resolve())}) for m in cfg.models
    ]})
    check_model_dirs(cfg)
    sessions = cfg.sessions.model_dump()
    models = {
        spec.name: ModelServer.options(**model_deployment_options(spec)).bind(spec.name, spec.model_dump(), sessions)
        for spec in cfg.models
    }
    ingress = Api.options(
        name="api",
        num_replicas=cfg.ingress.num_replicas,
        ray_actor_options=dict(cfg.ingress.ray_actor_options),
        max_ongoing_requests=cfg.ingress.max_ongoing_requests,
    )
    return ingress.bind(models, cfg.model_dump(mode="json"))

"""Building and deploying the Serve application from a serve config.

``serve run serve/config.yaml`` calls :func:`app_builder` with the config's ``args``;
``medgpt serve`` and the quickstart call :func:`deploy`, which reads the same file. Both end
in :func:`build_app`, the one place that turns a :class:`ServeConfig` into the bound
deployment with its options.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ray import serve

from medgpt.config import ConfigError, load_yaml
from medgpt.serving.config import ServeConfig

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "serve" / "config.yaml"


def app_builder(args: dict[str, Any]) -> serve.Application:
    """``serve run serve/config.yaml``: the config's ``args`` → the app. Serve requires a
    builder of exactly one parameter (it refuses a second, even with a default)."""
    return build_app(args)


def build_app(
    args: dict[str, Any] | ServeConfig | None, name: str | None = None
) -> serve.Application:
    """The app from the serve config's ``args`` (a mapping, checked here, or a ServeConfig);
    ``name`` renames the deployment (two apps of one cluster side by side in tests).

    Runs on the driver: relative paths become absolute (replicas run in another cwd), and the
    checkpoint is resolved here first, so a wrong path or registry name fails at once with
    one line instead of as a replica that keeps crashing."""
    from medgpt.checkpoint import read_config
    from medgpt.registry import resolve_checkpoint
    from medgpt.serving.deployment import MedgptServer
    from medgpt.tracking import tracking_uri_for

    cfg = args if isinstance(args, ServeConfig) else ServeConfig.from_dict(args)
    data = cfg.to_dict()
    data["storage_path"] = str(Path(cfg.storage_path).resolve())
    if not cfg.checkpoint.startswith(("models:/", "runs:/")) and Path(cfg.checkpoint).exists():
        data["checkpoint"] = str(Path(cfg.checkpoint).resolve())
    data["tracking_uri"] = tracking_uri_for(data["storage_path"], cfg.tracking_uri)
    path, _ = resolve_checkpoint(
        data["checkpoint"], data["tracking_uri"], Path(data["storage_path"]) / "downloads"
    )
    read_config(path)  # a medgpt checkpoint, readable
    options = cfg.deployment_options()
    if name:
        options["name"] = name
    return MedgptServer.options(**options).bind(data)


def _preflight(cfg: ServeConfig) -> None:
    """Replicas resolve the checkpoint themselves, on whatever node they land: on several
    nodes it must not be a local folder or a local MLflow store (medgpt.preflight)."""
    from medgpt import preflight
    from medgpt.tracking import tracking_uri_for

    uri = tracking_uri_for(str(Path(cfg.storage_path).resolve()), cfg.tracking_uri)
    registry_ref = cfg.checkpoint.startswith(("models:/", "runs:/"))
    local = None if registry_ref or "://" in cfg.checkpoint else cfg.checkpoint
    preflight.check_settings(
        len(preflight.alive_nodes()), local, uri if registry_ref else None, "checkpoint"
    )
    preflight.probe_nodes(None, uri if registry_ref else None)


def load_serve_file(
    path: str | Path, overrides: dict[str, Any] | None = None
) -> tuple[dict[str, Any], ServeConfig]:
    """A Serve config file → (its first application's entry, the checked ServeConfig of its
    ``args`` with ``overrides`` applied). Errors name the file and the key."""
    raw = load_yaml(path)
    try:
        app_cfg = raw["applications"][0]
    except (KeyError, IndexError, TypeError):
        raise ConfigError(f"{path}: no applications[0] (a Serve config file)") from None
    args = dict(app_cfg.get("args") or {})
    args.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        cfg = ServeConfig.from_dict(args, prefix="args.")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return {"http_options": raw.get("http_options") or {}, **app_cfg}, cfg


def deploy(
    config: str | Path = DEFAULT_CONFIG,
    overrides: dict[str, Any] | None = None,
    host: str | None = None,
    port: int | None = None,
) -> str:
    """Deploy a Serve config file's application (``overrides`` replace its args) on
    RAY_ADDRESS, the Ray this process already joined, or a new local one; returns its URL."""
    import ray

    app_cfg, cfg = load_serve_file(config, overrides)
    app = build_app(cfg)
    http = dict(app_cfg["http_options"])
    http.update({k: v for k, v in (("host", host), ("port", port)) if v is not None})
    if not ray.is_initialized():
        from medgpt.launch import job_env

        # Replicas read s3:// checkpoints and the tracking server with the driver's settings.
        env = job_env()
        ray.init(
            address=os.environ.get("RAY_ADDRESS"), runtime_env={"env_vars": env} if env else None
        )
    _preflight(cfg)
    serve.start(http_options=http)
    url = f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}"
    print(f"serving {cfg.checkpoint} at {url}", flush=True)
    serve.run(
        app, name=app_cfg.get("name", "medgpt"), route_prefix=app_cfg.get("route_prefix", "/")
    )
    return url

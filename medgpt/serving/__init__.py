"""Ray Serve application: the champion model behind an OpenAI-compatible HTTP API.

- :mod:`.config`: :class:`ServeConfig`, the serve config's ``args`` (engine and deployment);
- :mod:`.deployment`: the replica (engine thread, lifecycle, metrics, routes);
- :mod:`.responses`: engine events → OpenAI and ``/generate`` bodies (no Ray, no torch);
- :mod:`.app`: building the app from a config, and deploying it (``medgpt serve``).

Started by ``serve run serve/config.yaml`` (``import_path: medgpt.serving:app_builder``) or
``medgpt serve``. Request bodies and limits are :mod:`medgpt.api`'s.

The names below are loaded on first use, so that ``medgpt.serving.responses`` and
``.config`` import without Ray.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DEFAULT_CONFIG": "medgpt.serving.app",
    "app_builder": "medgpt.serving.app",
    "build_app": "medgpt.serving.app",
    "deploy": "medgpt.serving.app",
    "load_serve_file": "medgpt.serving.app",
    "ServeConfig": "medgpt.serving.config",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'medgpt.serving' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)

"""The model server's HTTP contract (see :mod:`medgpt.api.protocol`); no torch, no Ray."""

from medgpt.api.protocol import *  # noqa: F403
from medgpt.api.protocol import __all__  # noqa: F401

"""Typed configuration dataclasses and the one mapping from YAML/CLI/dicts onto them.

Dataclasses own defaults and validation; everything else (YAML recipes, CLI flags, Tune's
param_space) is a plain mapping passed through :func:`from_mapping`, so an unknown key or a
value of the wrong type is reported the same way everywhere: naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from medgpt.errors import ConfigError

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return f"list of {_type_name(inner)}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if dataclasses.is_dataclass(arg) and isinstance(value, Mapping):
                # The value clearly means this dataclass: its own error is the useful one.
                return _coerce(value, arg, key)
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        (inner,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_mapping(tp, value, prefix=f"{key}.")
    # bool is a subclass of int: never let True pass as 1 or 1 as True.
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def from_mapping(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and ill-typed values.

    The dataclass's ``__post_init__`` then checks ranges and relations between fields.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(str(k) for k in set(data) - fields)
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]!s} (allowed: {', '.join(sorted(fields))})"
        )
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if prefix:
            raise ConfigError(f"{prefix.rstrip('.')}: {e}") from None
        raise


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML recipe; a missing file or YAML syntax error becomes a ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclasses.dataclass
class ModelConfig:
    """Shape of a GPT-2-style model. Defaults are GPT-2 small (124M)."""

    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024  # maximum context (learned position embeddings)
    vocab_size: int = 50257
    dropout: float = 0.0
    bias: bool = True
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            _require(getattr(self, name) >= 1, f"{name}: must be >= 1, got {getattr(self, name)}")
        _require(
            self.n_embd % self.n_head == 0,
            f"n_embd: must be divisible by n_head ({self.n_embd} % {self.n_head} != 0)",
        )
        _require(0.0 <= self.dropout < 1.0, f"dropout: must be in [0, 1), got {self.dropout}")
        _require(
            self.layer_norm_epsilon > 0,
            f"layer_norm_epsilon: must be > 0, got {self.layer_norm_epsilon}",
        )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named size (``tiny``, ``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl``)."""
        if name not in MODEL_PRESETS:
            raise ConfigError(f"unknown model size {name!r} (allowed: {', '.join(MODEL_PRESETS)})")
        return from_mapping(cls, {**MODEL_PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # For tests: runs in milliseconds on a CPU.
    "tiny": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 64},
    "gpt2": {"n_layer": 12, "n_head": 12, "n_embd": 768},  # 124M
    "gpt2-medium": {"n_layer": 24, "n_head": 16, "n_embd": 1024},  # 350M
    "gpt2-large": {"n_layer": 36, "n_head": 20, "n_embd": 1280},  # 774M
    "gpt2-xl": {"n_layer": 48, "n_head": 25, "n_embd": 1600},  # 1558M
}

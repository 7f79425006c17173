"""Typed configuration dataclasses and the one mapping from YAML/CLI/dicts onto them.

Dataclasses own defaults and validation; everything else (YAML recipes, CLI flags, Tune's
param_space) is a plain mapping passed through :func:`from_mapping`, so an unknown key or a
value of the wrong type is reported the same way everywhere: naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
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
        if isinstance(value, str):
            # YAML 1.1 reads "3e-4" (no dot) as a string; accept it as the number it spells.
            try:
                return float(value)
            except ValueError:
                pass
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
            # "field: problem" becomes "section.field: problem"; other messages get the section.
            msg = str(e)
            if re.match(r"^[A-Za-z_][\w.\[\]]*: ", msg):
                raise ConfigError(f"{prefix}{msg}") from None
            raise ConfigError(f"{prefix.rstrip('.')}: {msg}") from None
        raise


# --- command-line flags declared on the fields ----------------------------------------------
# A field made with option() is also a flag: argparse gets the flag and its help from the
# field, and a flag given becomes an Override of the field's dotted key, checked against the
# field's type here and against its ranges by from_mapping, like the same key in a YAML recipe
# or a --set override.


def option(
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Any = dataclasses.MISSING,
    flag: str,
    help: str,
) -> Any:
    """A dataclass field that is also the command-line flag ``flag`` (``--max-steps``; a bool
    declared ``--no-X`` turns the field off) described by ``help``."""
    return dataclasses.field(
        default=default, default_factory=default_factory, metadata={"flag": flag, "help": help}
    )


@dataclasses.dataclass(frozen=True)
class Flag:
    """A declared flag: its name, the dotted config key it sets, the field's type, its help."""

    flag: str
    key: str
    type: Any
    help: str

    @property
    def negated(self) -> bool:
        return self.type is bool and self.flag.startswith("--no-")

    @property
    def metavar(self) -> str:
        return self.flag.lstrip("-").replace("-", "_").upper()


def flags_of(cls: type, prefix: str = "") -> list[Flag]:
    """The flags declared on ``cls``'s fields and, with dotted keys, on its dataclass fields."""
    hints = typing.get_type_hints(cls)
    out: list[Flag] = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if "flag" in f.metadata:
            out.append(Flag(f.metadata["flag"], prefix + f.name, tp, f.metadata["help"]))
        elif dataclasses.is_dataclass(tp):
            out.extend(flags_of(tp, f"{prefix}{f.name}."))
    return out


def flag_for(cls: type, key: str, **changes: Any) -> Flag:
    """The flag declared for ``key`` (e.g. ``job.storage_path``); ``changes`` replace some of
    its parts where one command describes it in its own words (``help=...``)."""
    for fl in flags_of(cls):
        if fl.key == key:
            return dataclasses.replace(fl, **changes)
    raise KeyError(f"no flag is declared for {key} in {cls.__name__}")


def add_flags(parser: Any, flags: Iterable[Flag]) -> None:
    """Add ``flags`` to an argparse parser. Every default is None, so that only flags given
    override a recipe; the value stays text until :func:`given_flags` reads it."""
    for fl in flags:
        if fl.type is bool:
            action = "store_false" if fl.negated else "store_true"
            parser.add_argument(fl.flag, dest=fl.key, action=action, default=None, help=fl.help)
        elif typing.get_origin(fl.type) is list:
            parser.add_argument(
                fl.flag, dest=fl.key, action="append", metavar=fl.metavar, help=fl.help
            )
        else:
            parser.add_argument(fl.flag, dest=fl.key, metavar=fl.metavar, help=fl.help)


def _accepts_str(tp: Any) -> bool:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_accepts_str(a) for a in typing.get_args(tp))
    return tp is str or tp is Any


def _from_text(raw: Any, tp: Any) -> Any:
    """A flag's text as the field's type reads it: text for a text field (``--name 2024`` is a
    name, not a number), YAML otherwise (``--max-steps 40``)."""
    if isinstance(raw, list):
        (inner,) = typing.get_args(tp) or (Any,)
        return [_from_text(r, inner) for r in raw]
    if not isinstance(raw, str) or _accepts_str(tp):
        return raw
    return parse_scalar(raw)


def given_flags(args: Any, flags: Iterable[Flag]) -> list[Override]:
    """The flags given on the command line (an argparse namespace) as overrides of their
    keys; a value of the wrong type is refused naming the flag, the key and the type."""
    out: list[Override] = []
    for fl in flags:
        raw = getattr(args, fl.key, None)
        if raw is None:
            continue
        try:
            value = _coerce(_from_text(raw, fl.type), fl.type, fl.key)
        except ConfigError as e:
            raise ConfigError(f"{fl.flag}: {e}") from None
        shown = fl.flag if isinstance(raw, bool) else f"{fl.flag} {raw}"
        out.append(Override(fl.key, value, shown))
    return out


# ``${VAR}``, ``${VAR:-default}`` and ``$$``; a ``${`` that is neither is a mistake worth naming.
_ENV_REF = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}|\{[^}]*\}?)")
ENV_FORMS = "${VAR}, ${VAR:-default}, $$ for a literal $"


def _expand_text(text: str, where: str, env: Mapping[str, str]) -> str:
    def one(m: re.Match[str]) -> str:
        whole, name, default = m.group(0), m.group(1), m.group(2)
        if whole == "$$":
            return "$"
        if name is None:
            raise ConfigError(f"{where}: bad variable reference {whole!r} (allowed: {ENV_FORMS})")
        value = env.get(name)
        if default is not None:
            return value if value else default[2:]
        if value is None:
            raise ConfigError(
                f"{where}: environment variable {name} is not set (set it in the "
                f"environment, or give the value a default: ${{{name}:-default}})"
            )
        return value

    return _ENV_REF.sub(one, text)


def expand_env(
    data: Any,
    where: str = "",
    env: Mapping[str, str] | None = None,
    skip: Iterable[str] = (),
) -> Any:
    """``data`` with environment variables expanded in every string value (never in keys):
    ``${VAR}`` (an error naming ``where``, the key and the variable when it is unset),
    ``${VAR:-default}`` (the default when unset or empty) and ``$$`` for a literal ``$``; a
    bare ``$x`` stays as written. A value stays text after expansion, and values of other
    types are returned as they are. Values at the dotted keys in ``skip`` (ones a flag or an
    override replaces anyway) are left as written, so their variables need not be set."""
    env = os.environ if env is None else env
    skipped = set(skip)

    def walk(node: Any, key: str) -> Any:
        if key in skipped:
            return node
        if isinstance(node, str):
            return _expand_text(node, f"{where}: {key}" if where and key else where or key, env)
        if isinstance(node, Mapping):
            return {k: walk(v, f"{key}.{k}" if key else str(k)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, f"{key}[{i}]") for i, v in enumerate(node)]
        return node

    return walk(data, "")


def load_yaml(path: str | Path, skip: Iterable[str] = ()) -> dict[str, Any]:
    """Read a YAML recipe; a missing file or YAML syntax error becomes a ConfigError.

    Environment variables in its string values are expanded (:func:`expand_env`), so one
    recipe serves a laptop and a cluster: ``storage_path: ${MEDGPT_STORAGE:-runs}``. ``skip``:
    dotted keys the caller replaces (``job.storage_path`` when ``--storage`` is given), whose
    values are returned unexpanded."""
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
    return expand_env(data, str(p), skip=skip)


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


DEFAULT_SAMPLE_PROMPTS = [
    "Question: What are the symptoms of diabetes?\nAnswer:",
    "Question: How is high blood pressure treated?\nAnswer:",
    "ICD-10-CM Chapter 9: Diseases of the circulatory system (I00-I99)",
]


@dataclasses.dataclass
class TrainConfig:
    """The optimisation: data, schedule, evaluation and checkpoint cadence."""

    data_dir: str = option(
        "data/icd10cm", flag="--data", help="prepared dataset folder (train.data_dir)"
    )
    # "scratch", a medgpt checkpoint folder, a Hugging Face GPT-2 folder, or a hub id (gpt2...)
    init_from: str = option(
        "scratch", flag="--init-from", help="scratch | checkpoint folder | HF folder | hub id"
    )
    seq_len: int = 256  # tokens per training window (<= model.block_size)
    micro_batch_size: int = 8  # windows per forward pass on one worker
    batch_tokens: int = 16384  # tokens per optimizer step, all workers together
    max_steps: int = option(1000, flag="--max-steps", help="optimizer steps (train.max_steps)")
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    eval_every: int = 100
    eval_batches: int = 20  # micro-batches of validation in all, split over the workers
    checkpoint_every: int = 200
    keep_checkpoints: int = 2  # best N by val_loss, plus the latest
    log_every: int = 10
    sample_prompts: list[str] = dataclasses.field(
        default_factory=lambda: list(DEFAULT_SAMPLE_PROMPTS)
    )
    sample_tokens: int = 48
    seed: int = 1337
    # torch.compile: true falls back to eager (one warning) where it cannot build (Triton's
    # launcher on a GPU, inductor's C++ on a CPU: no C compiler or Python headers); "required"
    # fails the run instead. The CPU recipes leave it off: their runs are too short to repay
    # the compile time.
    compile: bool | str = False
    # Recompute each block's activations in backward (memory for compute): medgpt plan shows
    # what it saves; the gradients are the same.
    activation_checkpointing: bool = False
    threads_per_worker: int = 0  # torch threads on CPU workers; 0 = the worker's CPUs

    def __post_init__(self) -> None:
        for name in (
            "seq_len", "micro_batch_size", "batch_tokens", "max_steps", "eval_every",
            "eval_batches", "checkpoint_every", "keep_checkpoints", "log_every",
        ):  # fmt: skip
            _require(getattr(self, name) >= 1, f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "sample_tokens", "threads_per_worker"):
            _require(getattr(self, name) >= 0, f"{name}: must be >= 0, got {getattr(self, name)}")
        _require(
            self.compile in (True, False, "required"),
            f"compile: {self.compile!r} (allowed: true, false, required)",
        )
        _require(self.lr > 0, f"lr: must be > 0, got {self.lr}")
        _require(0 <= self.min_lr <= self.lr, f"min_lr: must be in [0, lr], got {self.min_lr}")
        _require(self.weight_decay >= 0, f"weight_decay: must be >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            _require(0 <= v < 1, f"{name}: must be in [0, 1), got {v}")
        _require(self.grad_clip >= 0, f"grad_clip: must be >= 0 (0 = off), got {self.grad_clip}")
        _require(bool(self.data_dir), "data_dir: must name a prepared dataset folder")
        _require(bool(self.init_from), "init_from: 'scratch', a checkpoint, HF folder or hub id")

    def grad_accum_steps(self, world_size: int) -> int:
        """Micro-steps per optimizer step; batch_tokens must split evenly over the workers."""
        per_micro = self.micro_batch_size * self.seq_len * world_size
        if self.batch_tokens % per_micro:
            raise ConfigError(
                f"batch_tokens: {self.batch_tokens} is not a multiple of micro_batch_size x "
                f"seq_len x workers = {self.micro_batch_size} x {self.seq_len} x {world_size} "
                f"= {per_micro}"
            )
        return self.batch_tokens // per_micro


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK")
# ddp: every worker holds the whole model, gradients and AdamW state; fsdp: those are sharded
# over the workers (FSDP2), for models whose training state does not fit one GPU.
STRATEGIES = ("ddp", "fsdp")


@dataclasses.dataclass
class JobConfig:
    """Where and how a training run executes: Ray scaling, storage, fault tolerance, MLflow."""

    name: str = option(  # fixed run name: running again with it resumes
        "medgpt", flag="--name", help="run name; running again with the same name resumes"
    )
    storage_path: str = option(  # local folder or s3://, gs://; made absolute for the workers
        "runs", flag="--storage", help="run storage folder or URI (job.storage_path)"
    )
    num_workers: int = option(2, flag="--num-workers", help="Ray Train workers (job.num_workers)")
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 0  # worker-group restarts from the last checkpoint; -1 = unlimited
    # Default: sqlite database + artifact folder under storage_path (no server needed);
    # MLFLOW_TRACKING_URI in the environment wins over this default.
    mlflow_tracking_uri: str | None = None
    experiment: str = "medgpt"
    start_timeout_s: float = 120.0  # fail, rather than wait forever, when workers cannot start
    # How Ray places the workers: PACK (fewest nodes), SPREAD (across nodes when it can),
    # STRICT_SPREAD (one per node, or not at all: a lost node then cannot be replaced by a
    # node already in use).
    placement_strategy: str = "PACK"
    strategy: str = "ddp"

    def __post_init__(self) -> None:
        _require(
            self.strategy in STRATEGIES,
            f"strategy: {self.strategy!r} (allowed: {', '.join(STRATEGIES)})",
        )
        _require(
            bool(self.name) and "/" not in self.name,
            f"name: must be a plain folder name, got {self.name!r}",
        )
        _require(self.num_workers >= 1, f"num_workers: must be >= 1, got {self.num_workers}")
        _require(
            self.cpus_per_worker > 0, f"cpus_per_worker: must be > 0, got {self.cpus_per_worker}"
        )
        _require(self.max_failures >= -1, f"max_failures: must be >= -1, got {self.max_failures}")
        _require(
            self.start_timeout_s > 0, f"start_timeout_s: must be > 0, got {self.start_timeout_s}"
        )
        _require(
            self.placement_strategy in PLACEMENT_STRATEGIES,
            f"placement_strategy: {self.placement_strategy!r} "
            f"(allowed: {', '.join(PLACEMENT_STRATEGIES)})",
        )


@dataclasses.dataclass
class Recipe:
    """A training recipe: the YAML files in configs/ have exactly these three sections."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    job: JobConfig = dataclasses.field(default_factory=JobConfig)

    def __post_init__(self) -> None:
        _require(
            self.train.seq_len <= self.model.block_size,
            f"train.seq_len: {self.train.seq_len} exceeds model.block_size {self.model.block_size}",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        return from_mapping(cls, data)


# --- overrides ---------------------------------------------------------------------------------
# ``KEY.PATH=VALUE`` with the value read as YAML: one parser for ``--set`` on every command (a
# recipe's section.key, a sweep's sweep.KEY / gate.KEY / space.SECTION.KEY) and for the flags
# declared on the dataclasses below, which become overrides of their own keys.

OVERRIDE_FORM = "section.key=value (e.g. train.lr=3e-4)"


@dataclasses.dataclass(frozen=True)
class Override:
    """One setting: a dotted key, its value, and what the user wrote (for messages)."""

    key: str
    value: Any
    given: str = ""

    @property
    def path(self) -> list[str]:
        return self.key.split(".")

    @property
    def head(self) -> str:
        return self.path[0]

    @property
    def rest(self) -> str:
        """The key after its first part: ``space.train.lr`` -> ``train.lr``."""
        return self.key.partition(".")[2]


def parse_override(item: str, form: str = OVERRIDE_FORM, dotted: bool = False) -> Override:
    """Read ``KEY.PATH=VALUE``; ``dotted``: the key must have a section (``sweep.name``), and
    ``form`` is what the error message says was expected."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or not all(key.split(".")) or (dotted and "." not in key):
        raise ConfigError(f"override {item!r}: expected {form}")
    return Override(key, parse_scalar(raw), item)


def set_path(
    data: Mapping[str, Any], path: Sequence[str], value: Any, given: str
) -> dict[str, Any]:
    """A copy of ``data`` with ``value`` at ``path``; the sections on the way are copied, so
    the caller's mapping (a recipe another trial also starts from) is never changed."""
    out = dict(data)
    node = out
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = {}
        elif not isinstance(child, Mapping):
            raise ConfigError(f"override {given!r}: {part} is not a section")
        node[part] = child = dict(child)
        node = child
    node[path[-1]] = value
    return out


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str | Override]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (or :class:`Override` objects, e.g. from flags) onto
    a recipe mapping; the result goes to :func:`from_mapping`, which checks it."""
    out = dict(data)
    for item in overrides:
        o = item if isinstance(item, Override) else parse_override(item)
        out = set_path(out, o.path, o.value, o.given or o.key)
    return out


def parse_scalar(raw: str) -> Any:
    """A value written as text (an override's right-hand side, an environment variable) read
    as YAML reads it: ``3e-4`` and ``8`` are numbers, ``true`` a bool, ``null`` None; text that
    is not valid YAML stays text."""
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw

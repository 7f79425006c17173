"""Self-describing checkpoint folders.

::

    step-000200/
      model.safetensors   weights (the tied output head is stored once, as the embedding)
      config.json         format, model config, tokenizer name
      meta.json           step, metrics, run config, data manifest hash, ...
      train_state.pt      optimizer, schedule, data position, RNG (training checkpoints only)

Serving needs only the first three. Loading never unpickles arbitrary objects: weights are
safetensors and ``train_state.pt`` is read with ``torch.load(weights_only=True)``. Folders are
written under a temporary name and renamed, so a crash never leaves a half-written checkpoint
under the final name.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from medgpt.config import ConfigError, ModelConfig, from_mapping
from medgpt.errors import CheckpointError
from medgpt.fsutil import read_json_object, staged_dir
from medgpt.model import GPT
from medgpt.tokenizer import TOKENIZER_NAME

FORMAT = "medgpt-checkpoint"
FORMAT_VERSION = 1
WEIGHTS, CONFIG, META, TRAIN_STATE = (
    "model.safetensors",
    "config.json",
    "meta.json",
    "train_state.pt",
)
_TIED = "lm_head.weight"
_INCOMPLETE = "missing (not a complete medgpt checkpoint)"


def is_checkpoint(path: str | os.PathLike[str]) -> bool:
    """A medgpt checkpoint folder (a Hugging Face folder has the same file names, so the
    config's format field decides)."""
    p = Path(path) / CONFIG
    try:
        return json.loads(p.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def save_checkpoint(
    path: str | os.PathLike[str],
    model: torch.nn.Module,
    meta: dict[str, Any],
    train_state: dict[str, Any] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint folder at ``path`` atomically (replacing one that is there).
    ``weights``: the model's full state dict when ``model`` itself holds only a shard (fsdp)."""
    model = getattr(model, "module", model)  # unwrap DDP
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    if not isinstance(model, GPT):
        raise TypeError(f"expected a medgpt GPT, got {type(model).__name__}")
    out = Path(path)
    with staged_dir(out) as tmp:
        state = {
            k: v.detach().to("cpu").contiguous()
            for k, v in (model.state_dict() if weights is None else weights).items()
            if k != _TIED
        }
        save_file(state, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": model.config.to_dict(),
            "tokenizer": TOKENIZER_NAME,
        }
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
        if train_state is not None:
            torch.save(train_state, tmp / TRAIN_STATE)
    return out


def read_config(path: str | os.PathLike[str]) -> tuple[ModelConfig, dict[str, Any]]:
    """The model config and the raw config.json of a checkpoint folder."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"no such checkpoint folder: {folder}")
    raw = read_json_object(folder / CONFIG, CheckpointError, _INCOMPLETE)
    if raw.get("format") != FORMAT:
        raise CheckpointError(f"{folder / CONFIG}: not a medgpt checkpoint (format != {FORMAT!r})")
    if raw.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{folder / CONFIG}: checkpoint format version {raw.get('format_version')!r}, "
            f"this medgpt reads {FORMAT_VERSION}"
        )
    try:
        config = from_mapping(ModelConfig, raw.get("model") or {})
    except ConfigError as e:
        raise CheckpointError(f"{folder / CONFIG}: bad model config ({e})") from None
    return config, raw


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    return read_json_object(Path(path) / META, CheckpointError, _INCOMPLETE)


def load_model(
    path: str | os.PathLike[str], dropout: float | None = None, device: str | torch.device = "cpu"
) -> GPT:
    """Our GPT with the checkpoint's weights (fp32)."""
    folder = Path(path)
    config, _ = read_config(folder)
    if dropout is not None:
        config = from_mapping(ModelConfig, {**config.to_dict(), "dropout": dropout})
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing (not a complete medgpt checkpoint)")
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights}: cannot read weights ({e})") from None
    # Built on the meta device and handed the file's tensors (assign): no random init to be
    # overwritten, and no second copy of the weights — loading GPT-2 124M peaked 474 MiB above
    # its resident size that way (a replica loading a new version beside the old one pays it).
    # The weights stay backed by the memory-mapped file (copy-on-write, as safetensors maps it):
    # a checkpoint file must never be rewritten in place while a model of it runs, and medgpt
    # never does (checkpoints and downloads are new folders renamed into place).
    with torch.device("meta"):
        model = GPT(config)
    state[_TIED] = state.get("transformer.wte.weight", torch.empty(0))
    expected = model.state_dict()
    bad = [k for k in expected if k not in state or state[k].shape != expected[k].shape]
    extra = [k for k in state if k not in expected]
    if bad or extra:
        raise CheckpointError(
            f"{weights}: weights do not match config.json "
            f"({'missing/mis-shaped ' + ', '.join(bad[:3]) if bad else 'unexpected ' + ', '.join(extra[:3])})"
        )
    model.load_state_dict(state, strict=True, assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # assign replaced the tie: tie again
    return model


def load_train_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    f = Path(path) / TRAIN_STATE
    if not f.is_file():
        raise CheckpointError(f"{f}: missing (a serving-only checkpoint cannot resume training)")
    try:
        # weights_only: only tensors and plain containers; never executes code from the file.
        state = torch.load(f, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{f}: corrupt training state ({first})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{f}: corrupt training state (not a mapping)")
    return state


SERVING_FILES = (WEIGHTS, CONFIG, META)
RUN_RESULT = "medgpt-result.json"  # medgpt.launch writes it into each training run's folder


def serving_sha256(path: str | os.PathLike[str]) -> str:
    """One hash over the files serving needs (names and contents): what the registry stores
    and checks on the way back. ``train_state.pt`` is not part of a registered model."""
    folder = Path(path)
    total = hashlib.sha256()
    for name in SERVING_FILES:
        f = folder / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (not a complete medgpt checkpoint)")
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        total.update(f"{name}\0{h.hexdigest()}\n".encode())
    return total.hexdigest()


def copy_serving_files(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    out = Path(dst)
    out.mkdir(parents=True, exist_ok=True)
    for name in SERVING_FILES:
        shutil.copy2(Path(src) / name, out / name)
    return out


def best_in_run(run_dir: str | os.PathLike[str]) -> Path:
    """The best checkpoint of a training run folder (``<storage>/<run name>``): the one its
    result file names, else the checkpoint with the lowest recorded val_loss, else the latest."""
    folder = Path(run_dir)
    result = folder / RUN_RESULT
    if result.is_file():
        try:
            best = json.loads(result.read_text(encoding="utf-8")).get("best_checkpoint")
        except (ValueError, AttributeError):
            best = None
        if best and is_checkpoint(best):
            return Path(best)
    found = sorted(p for p in folder.iterdir() if p.is_dir() and is_checkpoint(p))
    if not found:
        raise CheckpointError(f"{folder}: a folder without medgpt checkpoints")

    def key(p: Path) -> tuple[float, float]:
        try:
            meta = read_meta(p)
        except CheckpointError:
            return (math.inf, 0.0)
        loss = meta.get("val_loss")
        loss = float(loss) if isinstance(loss, (int, float)) else math.inf
        return (loss, -float(meta.get("step") or 0))

    return min(found, key=key)


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when there is one, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: no CUDA device on this machine (use cpu or auto)")
    return torch.device(name)

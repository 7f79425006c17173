"""``medgpt export``: a checkpoint as a Hugging Face GPT-2 folder or an ONNX model.

Any checkpoint reference :func:`medgpt.registry.resolve_checkpoint` knows (a checkpoint or run
folder, an MLflow run, ``models:/NAME@ALIAS``, ``s3://...``, a Hugging Face GPT-2 folder) is
loaded and written to ``out`` as one folder, atomically (:func:`medgpt.fsutil.staged_dir`):
the folder appears complete and checked, or not at all. Each carries ``medgpt-export.json``,
which says what it was made from.

- ``hf``: config.json, model.safetensors, vocab.json, merges.txt, tokenizer_config.json,
  special_tokens_map.json, generation_config.json (and tokenizer.json when the ``tokenizers``
  package is installed): ``transformers`` loads the model and its tokenizer from it offline.
- ``onnx``: model.onnx (``input_ids`` int64 [batch, seq] -> ``logits`` float32 [batch, seq,
  vocab], both axes dynamic; model.onnx.data beside it for models of 1 GiB or more), the GPT-2
  vocabulary files, and the result of checking it with onnxruntime against the torch model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from medgpt.errors import ConfigError, MedgptError
from medgpt.fsutil import staged_dir
from medgpt.model import GPT

__all__ = [
    "FORMATS",
    "ONNX_ATOL",
    "ONNX_OPSET",
    "PROVENANCE",
    "ExportError",
    "check_onnx_available",
    "check_out",
    "export_checkpoint",
    "export_hf",
    "export_onnx",
    "load_for_export",
    "verify_onnx",
]

FORMATS = ("hf", "onnx")
PROVENANCE = "medgpt-export.json"
ONNX_OPSET = 18
ONNX_ATOL = 1e-4  # max abs logit difference onnxruntime vs torch (fp32 measures ~1e-6)
INSTALL_HINT = "pip install 'medgpt[export]'"
_ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
# Weights past this go to model.onnx.data: one protobuf file cannot exceed 2 GiB.
_EXTERNAL_DATA_BYTES = 1 << 30


class ExportError(MedgptError):
    """An export that cannot be made or did not check out; nothing was written."""


def check_onnx_available() -> None:
    """ExportError naming the install command when the ONNX packages are missing."""
    missing = []
    for name in _ONNX_PACKAGES:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportError(
            f"--format onnx needs {', '.join(_ONNX_PACKAGES)} (missing: {', '.join(missing)}): "
            f"{INSTALL_HINT}"
        )


def check_out(out: Path, overwrite: bool, source: Path | None = None) -> None:
    """Refuse an ``out`` that is a file, holds something without ``overwrite``, or would take
    something other than an earlier export (or the checkpoint itself) with it when replaced."""
    if out.is_file() or (out.exists() and not out.is_dir()):
        raise ConfigError(f"--out {out}: a file; expected a folder (new, or an earlier export)")
    if source is not None:
        src, dst = source.resolve(), out.resolve()
        if dst == src or dst in src.parents:
            raise ConfigError(f"--out {out}: is (or holds) the checkpoint being exported {source}")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise ConfigError(
            f"--out {out}: exists and is not empty (--overwrite replaces an earlier export)"
        )
    if not (out / PROVENANCE).is_file():
        # --overwrite removes the folder: only one this command wrote (--out . must not go).
        raise ConfigError(
            f"--out {out}: not an earlier medgpt export (no {PROVENANCE}); --overwrite only "
            "replaces those: choose a new or empty folder"
        )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _provenance(fmt: str, source: dict[str, Any], folder: Path, **extra: Any) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        medgpt_version = version("medgpt")
    except PackageNotFoundError:
        from medgpt import __version__ as medgpt_version
    return {
        "format": fmt,
        "source": source,
        "files": {p.name: _sha256(p) for p in sorted(folder.iterdir()) if p.is_file()},
        "medgpt_version": medgpt_version,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def _write_provenance(folder: Path, record: dict[str, Any]) -> None:
    (folder / PROVENANCE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    # The staging folder is mkdtemp's (0700); an export is made to be handed on: the
    # permissions a folder made with mkdir would have.
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)


def export_hf(
    model: GPT, out: str | os.PathLike[str], overwrite: bool = False, source: dict | None = None
) -> Path:
    """``model`` as a Hugging Face GPT-2 folder with complete tokenizer files, atomically."""
    from medgpt.hf import hf_config_dict, write_hf_files, write_tokenizer_files

    target = Path(out)
    check_out(target, overwrite)
    hf_config_dict(model.config)  # bias=false cannot be expressed: refused before writing
    with staged_dir(target) as tmp:
        write_hf_files(model, tmp)
        write_tokenizer_files(tmp, model.config.block_size)
        _write_provenance(tmp, _provenance("hf", source or {}, tmp))
    return target


class _Logits(torch.nn.Module):
    """The graph ONNX gets: ``input_ids`` -> logits, no loss or KV cache arguments."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)[0]


def _verify_lengths(block_size: int) -> list[tuple[int, int]]:
    """(batch, seq) shapes checked with onnxruntime: two lengths other than the traced one
    (and a second batch size), up to the context, the longer capped to keep big models cheap."""
    short, long = min(5, block_size), min(block_size, 128)
    return [(2, short), (1, long)] if long != short else [(2, short)]


def verify_onnx(model: GPT, path: Path, atol: float | None = None) -> dict[str, Any]:
    """Run ``path`` in onnxruntime and compare its logits with ``model``'s on random ids;
    ExportError when the largest difference exceeds ``atol`` (:data:`ONNX_ATOL`)."""
    import numpy as np
    import onnxruntime as ort

    atol = ONNX_ATOL if atol is None else atol
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own exception types
        raise ExportError(f"ONNX check failed: onnxruntime cannot load the graph ({e})") from e
    g = torch.Generator().manual_seed(0)
    worst, shapes = 0.0, []
    for batch, seq in _verify_lengths(model.config.block_size):
        ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
        with torch.no_grad():
            expected = model(ids)[0].numpy()
        try:
            (got,) = session.run(["logits"], {"input_ids": ids.numpy()})
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(
                f"ONNX check failed: onnxruntime cannot run input {tuple(ids.shape)} ({first})"
            ) from e
        if got.shape != expected.shape:
            raise ExportError(
                f"ONNX check failed: logits of shape {got.shape} for input {tuple(ids.shape)}, "
                f"torch gives {expected.shape}"
            )
        worst = max(worst, float(np.abs(got - expected).max()))
        shapes.append([batch, seq])
    result = {
        "runtime": f"onnxruntime {ort.__version__}",
        "shapes": shapes,
        "max_abs_diff": worst,
        "atol": atol,
    }
    if not worst <= atol:  # also catches NaN
        raise ExportError(
            f"ONNX check failed: onnxruntime's logits differ from torch's by {worst:.3g} "
            f"(max abs, allowed {atol:g}) on shapes {shapes}; nothing was written"
        )
    return result


def _export_graph(model: GPT, path: Path) -> None:
    from torch.export import Dim

    block = model.config.block_size
    if block < 2:
        raise ExportError(f"block_size {block}: ONNX export needs a context of >= 2 positions")
    example = torch.zeros(2, min(3, block), dtype=torch.long)
    external = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    # The torch.export-based exporter (dynamo=True: torch's default since 2.9; it needs
    # onnxscript). The TorchScript one (dynamo=False) also gave equal logits here, but it is
    # deprecated in 2.13 and freezes every Python-level shape check into a constant with a
    # TracerWarning; torch.export checks the declared dims instead. Dims: batch free, seq up
    # to the context (torch.export assumes >= 2 while tracing; the graph runs seq=1 the same).
    dims = {"input_ids": {0: Dim("batch"), 1: Dim("seq", max=block)}}
    # The exporter logs a warning per torchvision op it cannot register (torchvision is not a
    # dependency) and tree-spec FutureWarnings: noise for a user, not about this model.
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                _Logits(model).eval(),
                (example,),
                str(path),
                input_names=["input_ids"],
                output_names=["logits"],
                dynamic_shapes=dims,
                opset_version=ONNX_OPSET,
                dynamo=True,
                external_data=external >= _EXTERNAL_DATA_BYTES,
                verbose=False,
            )
    except Exception as e:  # the exporter's errors are pages long: its cause, on one line
        cause = e.__cause__ or e
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        raise ExportError(f"ONNX export failed ({type(cause).__name__}: {first})") from e
    finally:
        registration.setLevel(level)


def export_onnx(
    model: GPT,
    out_dir: str | os.PathLike[str],
    overwrite: bool = False,
    source: dict | None = None,
) -> Path:
    """``model`` as ``out_dir/model.onnx`` plus the GPT-2 vocabulary files, checked with
    onnxruntime inside the staging folder before it takes ``out_dir``'s name: a mismatch is an
    ExportError and nothing is left at ``out_dir``. The check's result is in the provenance
    file's ``onnx.verification``. ``model`` is moved to CPU float32 (in place) first."""
    from medgpt.tokenizer import default_vocab_dir

    check_onnx_available()
    target = Path(out_dir)
    check_out(target, overwrite)
    model = model.to("cpu", torch.float32).eval()
    with staged_dir(target) as tmp:
        _export_graph(model, tmp / "model.onnx")
        check = verify_onnx(model, tmp / "model.onnx")
        vocab = default_vocab_dir()
        shutil.copyfile(vocab / "encoder.json", tmp / "vocab.json")
        shutil.copyfile(vocab / "vocab.bpe", tmp / "merges.txt")
        onnx = {
            "opset": ONNX_OPSET,
            "exporter": "torch.onnx.export(dynamo=True)",
            "inputs": {"input_ids": ["batch", "seq"]},
            "outputs": {"logits": ["batch", "seq", model.config.vocab_size]},
            "max_seq": model.config.block_size,
            "verification": check,
        }
        _write_provenance(tmp, _provenance("onnx", source or {}, tmp, onnx=onnx))
    return target


def load_for_export(
    spec: str, storage_path: str = "runs", tracking_uri: str | None = None
) -> tuple[GPT, Path, dict[str, Any]]:
    """The model a reference names, its local folder and what the provenance says of it."""
    from medgpt import preflight, tracking
    from medgpt.checkpoint import WEIGHTS, is_checkpoint, load_model, read_config, read_meta
    from medgpt.hf import load_hf_gpt2
    from medgpt.registry import resolve_checkpoint
    from medgpt.tokenizer import TOKENIZER_NAME

    storage = Path(storage_path).resolve()
    uri = tracking.tracking_uri_for(str(storage), tracking_uri)
    preflight.check_local(spec if "://" in spec else None, uri, write=False)
    path, registry = resolve_checkpoint(spec, uri, storage / "downloads")
    meta: dict[str, Any] = {}
    if is_checkpoint(path):
        _, raw = read_config(path)
        if raw.get("tokenizer") != TOKENIZER_NAME:
            raise ExportError(
                f"{path}: tokenizer {raw.get('tokenizer')!r}; export writes {TOKENIZER_NAME}'s "
                "vocabulary files and supports only that one"
            )
        model, meta, kind = load_model(path), read_meta(path), "medgpt-checkpoint"
    else:
        model, kind = load_hf_gpt2(path), "hf-gpt2"
    weights = path / WEIGHTS
    source = {
        "reference": spec,
        "path": str(path.resolve()),
        "kind": kind,
        "step": meta.get("step"),
        "val_loss": meta.get("val_loss"),
        "mlflow_run_id": meta.get("mlflow_run_id"),
        "registry": (
            {k: registry.get(k) for k in ("name", "version", "run_id", "aliases")}
            if registry
            else None
        ),
        "weights_sha256": _sha256(weights) if weights.is_file() else None,
    }
    return model.eval(), path, source


def export_checkpoint(
    spec: str,
    fmt: str,
    out: str | os.PathLike[str],
    overwrite: bool = False,
    storage_path: str = "runs",
    tracking_uri: str | None = None,
) -> Path:
    """Export the model ``spec`` names as ``fmt`` (:data:`FORMATS`) into the folder ``out``
    (returned), with its provenance in ``out/medgpt-export.json``. Cheap refusals (format,
    missing packages, ``out``) come before anything is resolved or downloaded."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: unknown (allowed: {', '.join(FORMATS)})")
    if fmt == "onnx":
        check_onnx_available()
    target = Path(out)
    check_out(target, overwrite)
    model, path, source = load_for_export(spec, storage_path, tracking_uri)
    check_out(target, overwrite, source=path)
    try:
        writer = export_hf if fmt == "hf" else export_onnx
        return writer(model, target, overwrite, source)
    except OSError as e:
        raise ExportError(f"--out {target}: cannot write ({e.strerror or e})") from None

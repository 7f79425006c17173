"""``medgpt export`` (medgpt.export): Hugging Face and ONNX round trips from every kind of
checkpoint reference, and bad input: exit 2, one line, nothing at --out."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from medgpt.checkpoint import load_model, save_checkpoint
from medgpt.cli import main
from medgpt.export import PROVENANCE
from medgpt.hf import load_hf_gpt2
from medgpt.testing import own_lines
from medgpt.testing.models import BLOCK, VOCAB, random_ids, tiny_gpt
from medgpt.tokenizer import get_tokenizer

transformers = pytest.importorskip("transformers")

SENTENCE = (
    "Patient, 67 y/o, presents with dyspnea & chronic cough; Hx: T2DM, HTN (BP 160/95 mmHg). "
    "Started metformin 500 mg b.i.d. — r/o CHF, naïve to β-blockers.\n\nPlan:\tCXR, BNP."
)


@pytest.fixture(autouse=True)
def _no_ambient_mlflow(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every test names its own store; a developer's MLFLOW_TRACKING_URI must not leak in.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("run") / "tiny"
    return save_checkpoint(run / "step-000010", tiny_gpt(seed=3), {"step": 10, "val_loss": 9.5})


@pytest.fixture(scope="module")
def onnx_export(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One ONNX export through the CLI, shared by the tests that read it."""
    pytest.importorskip("onnxruntime")
    out = tmp_path_factory.mktemp("onnx") / "model-onnx"
    code, stdout, err = _export_capture(ckpt, "onnx", out)
    assert code == 0, err
    return {"out": out, "stdout": stdout}


def _export(*args: str | Path) -> int:
    return main(["export", "--quiet", *map(str, args)])


def _export_capture(ckpt: Path, fmt: str, out: Path, *extra: str | Path) -> tuple[int, str, str]:
    """Run the command with its own capture (module fixtures cannot use capsys)."""
    import contextlib
    import io

    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        code = _export(
            "--checkpoint", ckpt, "--format", fmt, "--out", out,
            "--storage", out.parent / "store", *extra,
        )  # fmt: skip
    return code, o.getvalue(), e.getvalue()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _nothing_at(out: Path) -> None:
    """Neither the folder nor a staging folder beside it (``.<name>.*``) is left."""
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*"))


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)[0]


# --- Hugging Face ------------------------------------------------------------------------------


def test_hf_round_trip(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "hf"
    assert _export("--checkpoint", ckpt, "--format", "hf", "--out", out,
                   "--storage", tmp_path / "store") == 0  # fmt: skip
    lines = own_lines(capsys.readouterr().out)
    assert len(lines) == 1 and str(out) in lines[0] and "Hugging Face" in lines[0]
    assert {p.name for p in out.iterdir()} == {
        "config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer.json",
        "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", PROVENANCE,
    }  # fmt: skip

    ours = load_model(ckpt).eval()
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(out), local_files_only=True).eval()
    ids = random_ids(seed=4)
    with torch.no_grad():
        theirs = hf(ids).logits
    expected = _logits(ours, ids)
    assert theirs.shape == (2, BLOCK, VOCAB)
    assert (theirs - expected).abs().max().item() <= 1e-5
    assert expected.std().item() > 0.1  # not two near-zero tensors

    tok = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert tok.is_fast
    ids_ours = get_tokenizer().encode_ordinary(SENTENCE)
    assert tok.encode(SENTENCE) == ids_ours
    assert tok.decode(ids_ours) == SENTENCE
    assert tok.model_max_length == BLOCK
    assert tok.eos_token_id == tok.bos_token_id == 50256
    assert hf.generation_config.eos_token_id == 50256

    record = json.loads((out / PROVENANCE).read_text())
    assert record["format"] == "hf"
    src = record["source"]
    assert src["reference"] == str(ckpt) and src["path"] == str(ckpt.resolve())
    assert (src["step"], src["val_loss"], src["registry"]) == (10, 9.5, None)
    assert src["weights_sha256"] == _sha256(ckpt / "model.safetensors")
    assert record["torch_version"] == torch.__version__ and record["medgpt_version"]
    assert record["files"] == {p.name: _sha256(p) for p in out.iterdir() if p.name != PROVENANCE}


def test_hf_tokenizer_without_tokenizers_package(ckpt: Path, tmp_path: Path) -> None:
    """Without the ``tokenizers`` package no tokenizer.json is written, and AutoTokenizer
    still builds the same tokenizer from vocab.json/merges.txt."""
    from medgpt.export import export_hf

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "tokenizers", None)  # import tokenizers -> ImportError
        out = export_hf(load_model(ckpt), tmp_path / "hf")
    assert not (out / "tokenizer.json").exists()
    assert (out / "tokenizer_config.json").is_file()
    tok = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert tok.encode(SENTENCE) == get_tokenizer().encode_ordinary(SENTENCE)


def _run_folder(root: Path) -> tuple[Path, Path]:
    """A training run folder with two checkpoints; the second has the lower val_loss."""
    run = root / "run"
    save_checkpoint(run / "step-000010", tiny_gpt(seed=5), {"step": 10, "val_loss": 9.0})
    best = save_checkpoint(run / "step-000020", tiny_gpt(seed=6), {"step": 20, "val_loss": 7.0})
    return run, best


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_export_from_run_folder_takes_its_best(tmp_path: Path, capsys) -> None:
    run, best = _run_folder(tmp_path)
    out = tmp_path / "hf"
    assert _export("--checkpoint", run, "--format", "hf", "--out", out,
                   "--storage", tmp_path / "store") == 0  # fmt: skip
    assert str(best) in capsys.readouterr().out  # the line names the checkpoint it chose
    src = json.loads((out / PROVENANCE).read_text())["source"]
    assert (src["path"], src["step"], src["val_loss"]) == (str(best.resolve()), 20, 7.0)
    assert _same_weights(load_hf_gpt2(out), load_model(best))


def test_export_from_registry_alias(ckpt: Path, tmp_path: Path) -> None:
    from medgpt.registry import register_checkpoint
    from medgpt.tracking import start_or_resume_run

    store = tmp_path / "store"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    run_id, _ = start_or_resume_run(uri, "medgpt", "train-x", {}, {})
    reg = register_checkpoint(uri, ckpt, run_id, "medgpt", "champion", {})
    out = tmp_path / "hf"
    assert _export("--checkpoint", "models:/medgpt@champion", "--format", "hf", "--out", out,
                   "--storage", store) == 0  # fmt: skip
    src = json.loads((out / PROVENANCE).read_text())["source"]
    assert src["reference"] == "models:/medgpt@champion"
    assert src["registry"]["name"] == "medgpt" and src["registry"]["version"] == reg["version"]
    assert src["registry"]["run_id"] == run_id and src["step"] == 10
    assert src["weights_sha256"] == _sha256(ckpt / "model.safetensors")
    assert Path(src["path"]).is_relative_to(store / "downloads")
    assert _same_weights(load_hf_gpt2(out), load_model(ckpt))


def test_overwrite_replaces_an_earlier_export_whole(tmp_path: Path) -> None:
    run, best = _run_folder(tmp_path)
    first = run / "step-000010"
    out = tmp_path / "hf"
    common = ["--format", "hf", "--out", out, "--storage", tmp_path / "store"]
    assert _export("--checkpoint", first, *common) == 0
    (out / "stale.txt").write_text("from before")
    assert _export("--checkpoint", best, *common, "--overwrite") == 0
    assert not (out / "stale.txt").exists()
    src = json.loads((out / PROVENANCE).read_text())["source"]
    assert src["step"] == 20
    assert _same_weights(load_hf_gpt2(out), load_model(best))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run", "store"]  # no staging


# --- ONNX ----------------------------------------------------------------------------------------


def test_onnx_round_trip(ckpt: Path, onnx_export: dict) -> None:
    import numpy as np
    import onnx
    import onnxruntime as ort

    out = onnx_export["out"]
    line = onnx_export["stdout"].strip()
    assert "\n" not in line and str(out / "model.onnx") in line and "max abs diff" in line
    assert {p.name for p in out.iterdir()} == {"model.onnx", "vocab.json", "merges.txt", PROVENANCE}
    onnx.checker.check_model(str(out / "model.onnx"))
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type, outp.name) == ("input_ids", "tensor(int64)", "logits")
    assert all(isinstance(d, str) for d in inp.shape)  # both axes dynamic
    model = load_model(ckpt).eval()
    for seq in (7, BLOCK):
        ids = random_ids(batch=2, length=seq, seed=seq)
        (got,) = session.run(None, {"input_ids": ids.numpy()})
        expected = _logits(model, ids).numpy()
        assert got.shape == (2, seq, VOCAB)
        assert np.abs(got - expected).max() <= 1e-4

    record = json.loads((out / PROVENANCE).read_text())
    assert record["format"] == "onnx" and record["source"]["step"] == 10
    assert record["onnx"]["opset"] >= 17
    check = record["onnx"]["verification"]
    assert check["max_abs_diff"] <= check["atol"] == 1e-4
    assert len({tuple(s) for s in check["shapes"]}) == 2
    assert record["files"]["model.onnx"] == _sha256(out / "model.onnx")


def test_onnx_external_data_for_big_models(tmp_path: Path, monkeypatch) -> None:
    """Past the size limit the weights go to model.onnx.data beside model.onnx; it is
    verified in the staging folder and still loads from the final one (a relative reference)."""
    ort = pytest.importorskip("onnxruntime")
    import medgpt.export
    from medgpt.export import export_onnx

    monkeypatch.setattr(medgpt.export, "_EXTERNAL_DATA_BYTES", 0)
    model = tiny_gpt(seed=8)
    out = export_onnx(model, tmp_path / "onnx")
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "model.onnx.data"} <= names
    assert (out / "model.onnx").stat().st_size < (out / "model.onnx.data").stat().st_size
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = random_ids(batch=1, length=9, seed=8)
    (got,) = session.run(None, {"input_ids": ids.numpy()})
    assert abs(got - _logits(model, ids).numpy()).max() <= 1e-4
    record = json.loads((out / PROVENANCE).read_text())
    assert record["source"] == {} and "model.onnx.data" in record["files"]


def test_onnx_verification_failure_leaves_nothing(
    ckpt: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """The exported graph computes something else than the model: refused, and neither a new
    folder nor an earlier export at --out is touched."""
    pytest.importorskip("onnxruntime")
    import medgpt.export

    monkeypatch.setattr(
        medgpt.export._Logits, "forward", lambda self, input_ids: self.model(input_ids)[0] + 1e-2
    )
    common = ["--checkpoint", ckpt, "--format", "onnx", "--storage", tmp_path / "store"]
    out = tmp_path / "new"
    assert _export(*common, "--out", out) == 2
    lines = own_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "ONNX check failed" in lines[0] and "allowed 0.0001" in lines[0]
    _nothing_at(out)

    earlier = tmp_path / "earlier"
    assert _export("--checkpoint", ckpt, "--format", "hf", "--out", earlier,
                   "--storage", tmp_path / "store") == 0  # fmt: skip
    before = {p.name: p.read_bytes() for p in earlier.iterdir()}
    capsys.readouterr()
    assert _export(*common, "--out", earlier, "--overwrite") == 2
    assert "ONNX check failed" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in earlier.iterdir()} == before
    assert not list(tmp_path.glob(".earlier.*"))


def test_onnx_without_its_packages(ckpt: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    out = tmp_path / "onnx"
    assert _export("--checkpoint", ckpt, "--format", "onnx", "--out", out,
                   "--storage", tmp_path / "store") == 2  # fmt: skip
    lines = own_lines(capsys.readouterr().err)
    assert len(lines) == 1
    assert "missing: onnxruntime" in lines[0] and "pip install 'medgpt[export]'" in lines[0]
    _nothing_at(out)


# --- bad input: exit 2, one line, nothing written ----------------------------------------------


def _damaged(root: Path, ckpt: Path) -> Path:
    bad = root / "damaged" / "step-000010"
    shutil.copytree(ckpt, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return bad


def _biasless(root: Path) -> Path:
    return save_checkpoint(root / "nobias" / "step-1", tiny_gpt(bias=False), {"step": 1})


@pytest.mark.parametrize(
    ("case", "fmt", "expected"),
    [
        ("missing", "hf", "no such checkpoint"),
        ("damaged", "hf", "cannot read weights"),
        ("damaged", "onnx", "cannot read weights"),
        ("biasless", "hf", "bias=false cannot export"),
        ("registry", "hf", "no MLflow store at"),
        ("out under a file", "hf", "cannot write"),
    ],
)
def test_bad_checkpoint_or_destination(case, fmt, expected, ckpt, tmp_path, capsys) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    spec = {
        "missing": tmp_path / "no" / "such" / "checkpoint",
        "damaged": _damaged(tmp_path, ckpt) if case == "damaged" else None,
        "biasless": _biasless(tmp_path) if case == "biasless" else None,
        "registry": "models:/medgpt@champion",
        "out under a file": ckpt,
    }[case]
    out = tmp_path / "export"
    if case == "out under a file":
        (tmp_path / "a-file").write_text("x")
        out = tmp_path / "a-file" / "export"
    code = _export("--checkpoint", spec, "--format", fmt, "--out", out,
                   "--storage", tmp_path / "store")  # fmt: skip
    assert code == 2
    lines = own_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    assert lines[0].startswith("medgpt export: error: ") and expected in lines[0]
    if case == "out under a file":
        assert (tmp_path / "a-file").read_text() == "x"
    else:
        _nothing_at(out)


def test_unknown_format(ckpt: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "export"
    with pytest.raises(SystemExit) as exc:
        _export("--checkpoint", ckpt, "--format", "tflite", "--out", out)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'tflite'" in err and "'hf', 'onnx'" in err
    _nothing_at(out)

    from medgpt.errors import ConfigError
    from medgpt.export import export_checkpoint

    with pytest.raises(ConfigError, match=r"'tflite': unknown \(allowed: hf, onnx\)"):
        export_checkpoint(str(ckpt), "tflite", out)
    _nothing_at(out)


@pytest.mark.parametrize("overwrite", [False, True])
def test_existing_out_is_left_alone(ckpt, tmp_path, capsys, overwrite: bool) -> None:
    """Without --overwrite a non-empty folder is refused; with it, only an earlier export may
    be replaced (--out . --overwrite must not delete the working directory)."""
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    args = ["--checkpoint", ckpt, "--format", "hf", "--out", out, "--storage", tmp_path / "s"]
    assert _export(*args, *(["--overwrite"] if overwrite else [])) == 2
    lines = own_lines(capsys.readouterr().err)
    assert len(lines) == 1 and str(out) in lines[0]
    assert ("not an earlier medgpt export" if overwrite else "--overwrite") in lines[0]
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"
    assert not list(tmp_path.glob(".precious.*"))


def test_out_is_a_file(ckpt: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "model.onnx"
    out.write_bytes(b"not a folder")
    for extra in ([], ["--overwrite"]):
        assert _export("--checkpoint", ckpt, "--format", "hf", "--out", out,
                       "--storage", tmp_path / "s", *extra) == 2  # fmt: skip
        lines = own_lines(capsys.readouterr().err)
        assert len(lines) == 1 and "a file; expected a folder" in lines[0]
        assert out.read_bytes() == b"not a folder"


def test_out_holding_the_checkpoint_is_refused(tmp_path: Path, capsys) -> None:
    """An earlier HF export is itself a checkpoint reference; replacing it with its own ONNX or
    HF export, or replacing a folder that holds the source, would delete what is read."""
    run, _ = _run_folder(tmp_path)
    hf = tmp_path / "hf"
    assert _export("--checkpoint", run, "--format", "hf", "--out", hf,
                   "--storage", tmp_path / "s") == 0  # fmt: skip
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in hf.iterdir()}
    assert _export("--checkpoint", hf, "--format", "hf", "--out", hf,
                   "--storage", tmp_path / "s", "--overwrite") == 2  # fmt: skip
    lines = own_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "is (or holds) the checkpoint being exported" in lines[0]
    assert {p.name: p.read_bytes() for p in hf.iterdir()} == before

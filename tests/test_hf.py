"""HF GPT-2 folders (medgpt.hf): parity with transformers both ways, export, load errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medgpt.errors import MedgptError, WeightsError
from medgpt.hf import load_hf_gpt2, save_hf_gpt2
from medgpt.testing.models import BLOCK, N_EMBD, N_LAYER, VOCAB, hf_tiny, random_ids, tiny_gpt

transformers = pytest.importorskip("transformers")


# --- HF parity ---------------------------------------------------------------------------


def test_load_hf_safetensors_parity(tmp_path: Path) -> None:
    hf = hf_tiny()
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    ours = load_hf_gpt2(tmp_path).eval()
    assert ours.config.n_layer == N_LAYER and ours.config.block_size == BLOCK
    assert ours.config.vocab_size == VOCAB
    ids = random_ids()
    with torch.no_grad():
        expected = hf(ids).logits
        got, _ = ours(ids)
    assert got.shape == (2, BLOCK, VOCAB)
    assert (got - expected).abs().max().item() <= 1e-4
    assert expected.std().item() > 0.1  # the comparison is not between two near-zero tensors


def test_load_hf_pytorch_bin_parity(tmp_path: Path) -> None:
    hf = hf_tiny(seed=1)
    hf.save_pretrained(tmp_path, safe_serialization=False)
    if not (tmp_path / "pytorch_model.bin").is_file():
        # transformers 5 ignores safe_serialization=False: write the .bin by hand.
        for p in tmp_path.iterdir():
            if p.name != "config.json":
                p.unlink()
        torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    assert not (tmp_path / "model.safetensors").exists()
    ours = load_hf_gpt2(tmp_path).eval()
    ids = random_ids(seed=1)
    with torch.no_grad():
        diff = (ours(ids)[0] - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4


def test_export_round_trip(tmp_path: Path) -> None:
    model = tiny_gpt(seed=2)
    out = save_hf_gpt2(model, tmp_path / "export")
    assert out == tmp_path / "export"
    assert {p.name for p in out.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "vocab.json",
        "merges.txt",
    }
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(out)).eval()
    ids = random_ids(seed=2)
    with torch.no_grad():
        expected, _ = model(ids)
        diff = (hf(ids).logits - expected).abs().max().item()
    assert diff <= 1e-4
    # ...and back again into our module, bit for bit.
    again = load_hf_gpt2(out)
    for (n1, t1), (n2, t2) in zip(
        model.state_dict().items(), again.state_dict().items(), strict=True
    ):
        assert n1 == n2
        assert torch.equal(t1, t2), n1


def test_export_tokenizer(tmp_path: Path) -> None:
    out = save_hf_gpt2(tiny_gpt(), tmp_path / "export")
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.eos_token_id == 50256


def test_export_refuses_non_empty_folder(tmp_path: Path) -> None:
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(WeightsError) as exc:
        save_hf_gpt2(tiny_gpt(), out)
    assert str(out) in str(exc.value)
    assert "overwrite" in str(exc.value)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temp dir left behind

    # overwrite=True replaces the folder as a whole.
    save_hf_gpt2(tiny_gpt(), out, overwrite=True)
    assert not (out / "keep.txt").exists()
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_export_into_empty_existing_folder(tmp_path: Path) -> None:
    out = tmp_path / "export"
    out.mkdir()
    save_hf_gpt2(tiny_gpt(), out)
    assert (out / "config.json").is_file()


def test_export_bias_false_refused(tmp_path: Path) -> None:
    out = tmp_path / "export"
    with pytest.raises(WeightsError, match="bias"):
        save_hf_gpt2(tiny_gpt(bias=False), out)
    assert list(tmp_path.iterdir()) == []


# --- bad input for loading ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("hf")
    hf_tiny(seed=10).save_pretrained(d)
    return d


def _copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


@pytest.mark.parametrize(
    ("missing", "also"),
    [("config.json", []), ("model.safetensors", ["pytorch_model.bin"])],
)
def test_load_without_a_file_names_it(tmp_path: Path, hf_folder: Path, missing, also) -> None:
    d = _copy_folder(hf_folder, tmp_path / "m")
    (d / missing).unlink()
    with pytest.raises(WeightsError, match=re.escape(missing)) as exc:
        load_hf_gpt2(d)
    assert str(d) in str(exc.value)
    for fragment in also:  # what else it looked for
        assert fragment in str(exc.value)


@pytest.mark.parametrize("keep", [0, 4, 100, "half"])
def test_load_truncated_safetensors(tmp_path: Path, hf_folder: Path, keep) -> None:
    d = _copy_folder(hf_folder, tmp_path / "m")
    p = d / "model.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2 if keep == "half" else keep])
    with pytest.raises(WeightsError, match="cannot read weights") as exc:
        load_hf_gpt2(d)
    assert str(d) in str(exc.value)


def test_load_relu_activation(tmp_path: Path, hf_folder: Path) -> None:
    d = _copy_folder(hf_folder, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["activation_function"] = "relu"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError) as exc:
        load_hf_gpt2(d)
    msg = str(exc.value)
    assert "config.json" in msg and "activation_function" in msg and "'relu'" in msg
    assert "gelu_new" in msg  # names what is allowed


def test_load_config_not_json(tmp_path: Path, hf_folder: Path) -> None:
    d = _copy_folder(hf_folder, tmp_path / "m")
    (d / "config.json").write_text('{"n_layer": 2,, oops')
    with pytest.raises(WeightsError, match="not valid JSON") as exc:
        load_hf_gpt2(d)
    assert str(d / "config.json") in str(exc.value)


def test_load_config_bad_value(tmp_path: Path, hf_folder: Path) -> None:
    d = _copy_folder(hf_folder, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["n_head"] = 3  # 32 % 3 != 0
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match=r"config\.json: n_embd"):
        load_hf_gpt2(d)


def _hf_folder(folder: Path, hf, state: dict[str, torch.Tensor]) -> Path:
    """An HF GPT-2 folder: ``hf``'s config.json beside ``state`` (edited weights) as
    model.safetensors."""
    from safetensors.torch import save_file

    hf.config.save_pretrained(folder)
    save_file(state, str(folder / "model.safetensors"))
    return folder


def _untied_state(hf) -> dict[str, torch.Tensor]:
    """``hf``'s weights as HF writes them: the tied head left out."""
    return {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}


def test_load_wrong_shape(tmp_path: Path) -> None:
    hf = hf_tiny(seed=11)
    state = _untied_state(hf)
    key = "transformer.h.1.mlp.c_fc.weight"
    assert state[key].shape == (N_EMBD, 4 * N_EMBD)
    state[key] = torch.zeros(N_EMBD, 3 * N_EMBD)
    d = _hf_folder(tmp_path / "m", hf, state)
    with pytest.raises(WeightsError) as exc:
        load_hf_gpt2(d)
    msg = str(exc.value)
    assert key in msg and "shape" in msg and str(d) in msg


def test_load_unexpected_and_missing_keys(tmp_path: Path) -> None:
    hf = hf_tiny(seed=12)
    state = _untied_state(hf)

    extra = {**state, "transformer.h.0.attn.q_proj.weight": torch.zeros(2)}
    with pytest.raises(WeightsError, match=r"transformer\.h\.0\.attn\.q_proj\.weight"):
        load_hf_gpt2(_hf_folder(tmp_path / "extra", hf, extra))

    del state["transformer.ln_f.bias"]
    with pytest.raises(WeightsError, match=r"transformer\.ln_f\.bias"):
        load_hf_gpt2(_hf_folder(tmp_path / "missing", hf, state))


def test_load_untied_head_refused(tmp_path: Path) -> None:
    hf = hf_tiny(seed=13)
    state = {k: v.clone().contiguous() for k, v in hf.state_dict().items()}
    state["lm_head.weight"] += 1.0
    with pytest.raises(WeightsError, match="tied"):
        load_hf_gpt2(_hf_folder(tmp_path / "m", hf, state))


def test_load_nonexistent_path(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(WeightsError, match="no such model folder") as exc:
        load_hf_gpt2(missing)
    assert str(missing) in str(exc.value)
    with pytest.raises(WeightsError, match="no such model folder"):
        load_hf_gpt2("./not-a-model")


def test_load_hub_id_offline(tmp_path: Path) -> None:
    hf_home = tmp_path / "hf-home"  # an empty cache: nothing to fall back on
    code = (
        "import sys\n"
        "from medgpt.errors import WeightsError\n"
        "from medgpt.hf import load_hf_gpt2\n"
        "try:\n"
        "    load_hf_gpt2('gpt2')\n"
        "except WeightsError as e:\n"
        "    print('WeightsError:', e)\n"
        "    sys.exit(3)\n"
        "print('loaded')\n"
    )
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_HOME=str(hf_home),
        HF_HUB_CACHE=str(hf_home / "hub"),
        HTTP_PROXY="http://127.0.0.1:9",
        HTTPS_PROXY="http://127.0.0.1:9",
        NO_PROXY="",
    )
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    msg = proc.stdout
    assert "'gpt2'" in msg
    assert "hub" in msg.lower()
    assert "offline" in msg.lower()


def test_weights_error_is_user_facing() -> None:
    assert issubclass(WeightsError, MedgptError)


# --- malformed config.json / weights files ---------------------------------------------------


def test_load_config_json_not_an_object(tmp_path: Path, hf_folder: Path) -> None:
    d = _copy_folder(hf_folder, tmp_path / "m")
    (d / "config.json").write_text("[1, 2]")
    with pytest.raises(WeightsError, match=r"config\.json"):
        load_hf_gpt2(d)


def test_load_config_null_n_embd(tmp_path: Path, hf_folder: Path) -> None:
    d = _copy_folder(hf_folder, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["n_embd"] = None
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="n_embd"):
        load_hf_gpt2(d)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize(
    "content", [b"not a pickle at all", b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01."]
)
def test_load_bin_not_a_weights_pickle(tmp_path: Path, hf_folder: Path, content: bytes) -> None:
    d = _copy_folder(hf_folder, tmp_path / "m")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(content)
    with pytest.raises(WeightsError, match=r"pytorch_model\.bin"):
        load_hf_gpt2(d)


def test_load_bin_not_a_dict(tmp_path: Path, hf_folder: Path) -> None:
    d = _copy_folder(hf_folder, tmp_path / "m")
    (d / "model.safetensors").unlink()
    torch.save([torch.zeros(2)], d / "pytorch_model.bin")
    with pytest.raises(WeightsError):
        load_hf_gpt2(d)

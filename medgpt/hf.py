"""Hugging Face GPT-2 folders: our :class:`medgpt.model.GPT` from theirs, and theirs from ours.

Parameter names are the same in both (OpenAI's original GPT-2 layout,
``transformer.h.0.attn.c_attn``...); the one difference is that HF stores the linear layers'
weights transposed (its ``Conv1D``), which :func:`load_hf_gpt2` and :func:`save_hf_gpt2`
account for. Loading never unpickles code: ``model.safetensors``, or a ``pytorch_model.bin``
through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from medgpt.config import ConfigError, ModelConfig, from_mapping
from medgpt.errors import WeightsError
from medgpt.fsutil import read_json_object, staged_dir
from medgpt.model import GPT

__all__ = [
    "HF_HUB_IDS",
    "hf_config_dict",
    "load_hf_gpt2",
    "model_config_from_hf",
    "save_hf_gpt2",
    "write_hf_files",
    "write_tokenizer_files",
]

HF_HUB_IDS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
# Linear layers that HF stores as Conv1D, i.e. with the weight transposed to (in, out).
_TRANSPOSED = (
    ".attn.c_attn.weight",
    ".attn.c_proj.weight",
    ".mlp.c_fc.weight",
    ".mlp.c_proj.weight",
)
# Non-parameter buffers older HF checkpoints carry.
_HF_BUFFERS = (".attn.bias", ".attn.masked_bias")
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def model_config_from_hf(hf: dict[str, Any], dropout: float = 0.0) -> ModelConfig:
    """Map a Hugging Face ``GPT2Config`` dict onto ModelConfig, refusing variants we don't run."""
    if not isinstance(hf, dict):
        raise WeightsError(f"config.json: expected a JSON object, got {type(hf).__name__}")
    if hf.get("model_type", "gpt2") != "gpt2":
        raise WeightsError(f"config.json: model_type {hf.get('model_type')!r} is not 'gpt2'")
    act = hf.get("activation_function", "gelu_new")
    if act not in _TANH_GELUS:
        raise WeightsError(
            f"config.json: activation_function {act!r} is not supported "
            f"(allowed: {', '.join(_TANH_GELUS)})"
        )
    for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if hf.get(flag):
            raise WeightsError(f"config.json: {flag}=true is not supported")
    if hf.get("scale_attn_weights", True) is not True:
        raise WeightsError("config.json: scale_attn_weights=false is not supported")
    try:
        config = from_mapping(
            ModelConfig,
            {
                "n_layer": hf.get("n_layer", 12),
                "n_head": hf.get("n_head", 12),
                "n_embd": hf.get("n_embd", 768),
                "block_size": hf.get("n_positions", 1024),
                "vocab_size": hf.get("vocab_size", 50257),
                "layer_norm_epsilon": hf.get("layer_norm_epsilon", 1e-5),
                "dropout": dropout,
            },
        )
    except ConfigError as e:
        raise WeightsError(f"config.json: {e}") from None
    if hf.get("n_inner") not in (None, 4 * config.n_embd):
        raise WeightsError(f"config.json: n_inner {hf['n_inner']} is not 4 * n_embd")
    return config


def _read_hf_folder(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    hf_config = read_json_object(
        folder / "config.json", WeightsError, "missing (not a Hugging Face model folder)"
    )
    st, pt = folder / "model.safetensors", folder / "pytorch_model.bin"
    try:
        if st.is_file():
            state = load_file(str(st))
        elif pt.is_file():
            # weights_only: a .bin is a pickle, and loading must never run code from it.
            state = torch.load(pt, map_location="cpu", weights_only=True)
        else:
            raise WeightsError(f"{folder}: neither model.safetensors nor pytorch_model.bin")
    except (SafetensorError, OSError, RuntimeError, pickle.UnpicklingError, EOFError) as e:
        name = st.name if st.is_file() else pt.name
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WeightsError(f"{folder / name}: cannot read weights ({first})") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise WeightsError(f"{folder}: the weights file does not hold a name -> tensor mapping")
    return hf_config, state


def _resolve_hf_source(source: str | os.PathLike[str]) -> Path:
    path = Path(source)
    if path.exists():
        return path
    name = str(source)
    # A hub id is either one of OpenAI's sizes or "owner/name"; anything else is a bad path.
    if name in HF_HUB_IDS or (name.count("/") == 1 and not name.startswith((".", "/"))):
        try:
            from huggingface_hub import snapshot_download

            return Path(
                snapshot_download(repo_id=name, allow_patterns=["config.json", "model.safetensors"])
            )
        except Exception as e:  # offline, unknown repo, auth: all one message for the user
            raise WeightsError(
                f"cannot download {name!r} from the Hugging Face hub "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                "offline, pass a local folder holding config.json and model.safetensors"
            ) from None
    raise WeightsError(
        f"no such model folder: {name} (or a hub id such as {', '.join(HF_HUB_IDS)})"
    )


def load_hf_gpt2(source: str | os.PathLike[str], dropout: float = 0.0) -> GPT:
    """Our GPT with the weights of a Hugging Face GPT-2 (local folder, or hub id when online)."""
    folder = _resolve_hf_source(source)
    hf_config, hf_state = _read_hf_folder(folder)
    config = model_config_from_hf(hf_config, dropout=dropout)
    model = GPT(config)
    ours = model.state_dict()
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in hf_state.items():
        name = key.removeprefix("transformer.")
        if name.endswith(_HF_BUFFERS):
            continue
        if name == "lm_head.weight":
            continue  # tied to wte; checked below
        name = f"transformer.{name}"
        if name not in ours:
            raise WeightsError(f"{folder}: unexpected weight {key!r} for a GPT-2 model")
        if name.endswith(_TRANSPOSED):
            tensor = tensor.t()
        if tensor.shape != ours[name].shape:
            raise WeightsError(
                f"{folder}: weight {key!r} has shape {tuple(tensor.shape)}, "
                f"config.json implies {tuple(ours[name].shape)}"
            )
        converted[name] = tensor.to(torch.float32)
    head = hf_state.get("lm_head.weight")
    wte = converted.get("transformer.wte.weight")
    if head is not None and wte is not None and not torch.equal(head.to(torch.float32), wte):
        raise WeightsError(f"{folder}: lm_head.weight is not tied to wte.weight")
    converted["lm_head.weight"] = wte if wte is not None else ours["lm_head.weight"]
    missing = sorted(set(ours) - set(converted))
    if missing:
        raise WeightsError(f"{folder}: missing weight(s) {', '.join(missing[:3])}")
    model.load_state_dict(converted, strict=True)
    return model


def hf_config_dict(config: ModelConfig) -> dict[str, Any]:
    """A config.json that ``transformers.GPT2LMHeadModel.from_pretrained`` accepts."""
    if not config.bias:
        raise WeightsError("Hugging Face GPT-2 has biases everywhere; bias=false cannot export")
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


def save_hf_gpt2(model: GPT, out_dir: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Write ``model`` as a Hugging Face GPT-2 folder (config.json, model.safetensors and the
    GPT-2 vocabulary as vocab.json/merges.txt), atomically: the folder appears complete or not
    at all."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise WeightsError(f"{out} exists and is not empty (pass overwrite=True to replace it)")
    hf_config_dict(model.config)  # refuses what HF cannot hold before anything is created
    with staged_dir(out) as tmp:
        write_hf_files(model, tmp)
    return out


def write_hf_files(model: GPT, folder: Path) -> list[str]:
    """The files of :func:`save_hf_gpt2` written into an existing ``folder`` (no staging: the
    caller's, e.g. medgpt.export's, which adds files of its own). Returns their names."""
    from medgpt.tokenizer import default_vocab_dir

    config_json = hf_config_dict(model.config)
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied: HF re-ties it from wte on load
        t = tensor.detach().to("cpu", torch.float32)
        if name.endswith(_TRANSPOSED):
            t = t.t()
        state[name] = t.contiguous()
    (folder / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    vocab = default_vocab_dir()
    shutil.copyfile(vocab / "encoder.json", folder / "vocab.json")
    shutil.copyfile(vocab / "vocab.bpe", folder / "merges.txt")
    return ["config.json", "model.safetensors", "vocab.json", "merges.txt"]


def write_tokenizer_files(folder: Path, block_size: int) -> list[str]:
    """Beside vocab.json/merges.txt, what ``transformers.AutoTokenizer`` and ``generate`` read
    from a model folder, so that neither guesses: the tokenizer class and its special tokens
    (GPT-2 has one, ``<|endoftext|>``, for bos/eos/unk), the context as model_max_length (else
    transformers assumes 1e30 and never truncates), and the fast tokenizer's tokenizer.json
    when the ``tokenizers`` package is here to build it (without it AutoTokenizer converts
    vocab.json/merges.txt itself, at load time). Returns the names written."""
    from medgpt.tokenizer import EOT_ID, EOT_TOKEN

    special = {"bos_token": EOT_TOKEN, "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN}
    files = {
        "tokenizer_config.json": {
            "tokenizer_class": "GPT2Tokenizer",
            **special,
            "model_max_length": block_size,
            "add_prefix_space": False,
            "add_bos_token": False,
            "errors": "replace",
            # Off: decode(encode(text)) gives back the text (tiktoken's decode does the same).
            "clean_up_tokenization_spaces": False,
        },
        "special_tokens_map.json": special,
        "generation_config.json": {"bos_token_id": EOT_ID, "eos_token_id": EOT_ID},
    }
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content, indent=2) + "\n")
    written = list(files)
    try:
        from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
        from tokenizers.models import BPE
    except ImportError:
        return written
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    # As transformers' GPT2Tokenizer builds it from the same two files.
    tok = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(EOT_TOKEN, special=True, normalized=False)])
    tok.save(str(folder / "tokenizer.json"))
    return [*written, "tokenizer.json"]

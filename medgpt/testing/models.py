"""Tiny GPT-2 models for the model and conversion tests: ours and Hugging Face's, same shape,
every parameter given non-trivial values (a wrong bias or LayerNorm mapping would otherwise
hide behind the default zeros and ones). transformers is imported only by ``hf_tiny``."""

from __future__ import annotations

from typing import Any

import torch

from medgpt.config import ModelConfig
from medgpt.model import GPT

__all__ = [
    "BLOCK",
    "N_EMBD",
    "N_HEAD",
    "N_LAYER",
    "VOCAB",
    "hf_tiny",
    "random_ids",
    "randomize_",
    "tiny_config",
    "tiny_gpt",
]

N_LAYER, N_HEAD, N_EMBD, BLOCK = 2, 2, 32, 64
VOCAB = 50257  # GPT-2's: the conversion tests compare against HF's real vocabulary size


def tiny_config(**overrides: Any) -> ModelConfig:
    base = {"n_layer": N_LAYER, "n_head": N_HEAD, "n_embd": N_EMBD, "block_size": BLOCK}
    return ModelConfig(**{**base, **overrides})


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter non-trivial values, in place: default inits leave biases at 0 and
    LayerNorm at (1, 0), which would hide a bias or LayerNorm mapping mistake."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if ".ln_" in name or name.startswith(("ln_", "transformer.ln_")):
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.05 * noise)
    return model


def tiny_gpt(seed: int = 0, **overrides: Any) -> GPT:
    torch.manual_seed(seed)
    return randomize_(GPT(tiny_config(**overrides)), seed).eval()


def hf_tiny(seed: int = 0) -> Any:
    """A ``transformers.GPT2LMHeadModel`` of ``tiny_config``'s shape, dropout off."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        n_layer=N_LAYER,
        n_head=N_HEAD,
        n_embd=N_EMBD,
        n_positions=BLOCK,
        vocab_size=VOCAB,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = transformers.GPT2LMHeadModel(cfg)
    randomize_(model.transformer, seed)  # lm_head is tied to wte
    return model.eval()


def random_ids(batch: int = 2, length: int = BLOCK, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)

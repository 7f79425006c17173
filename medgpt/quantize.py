"""Int8 quantisation of a GPT for CPU serving.

:func:`quantize_int8` swaps every ``nn.Linear`` (the attention and MLP projections and the
output head) for PyTorch's dynamically quantised linear layer: weights stored as int8 with one
scale per output row (per-channel), activations quantised on the fly per call, the matmul done
by fbgemm/oneDNN's int8 kernels. At batch 1, decoding reads every weight once per token, so a
quarter of the bytes is most of the speed-up; prefill and scoring get faster too.

What stays float32: the token and position embeddings, the LayerNorms and the KV cache. The
output head is tied to the token embedding in float32 models; here the head gets its own int8
copy of that matrix while ``transformer.wte`` keeps the float32 one for the lookups, so the two
no longer share storage (the int8 head adds ``vocab × n_embd`` bytes, a quarter of the
embedding). A quantised model is for inference only: it cannot be trained, and it is not saved
as a checkpoint (quantise again after loading the float32 weights; it takes 3-5 s for GPT-2
124M on 2 cores).

Why not torchao: on this project's CPUs (AVX2, torch 2.13) torchao 0.18's ``quantize_`` with
``Int8WeightOnlyConfig`` decoded GPT-2 124M at ~6 tokens/s and with
``Int8DynamicActivationInt8WeightConfig`` at ~11, against ~19 for float32 and ~55 for this, in
a probe on a 2-core machine (docs/benchmarks.md has the benchmark). ``quantize_dynamic`` is
deprecated in favour of torchao, but still ships and works in torch 2.13; its deprecation
warnings are silenced here.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn

from medgpt.kernels import SmallBatchLinear
from medgpt.model import GPT

__all__ = ["is_quantized", "quantize_int8", "weight_bytes"]

# The warnings quantize_dynamic raises in torch >= 2.10 (the API and the quantised tensor
# dtypes are deprecated, not broken); anything else still shows.
_DEPRECATIONS = (
    r"(?s).*torch\.ao\.quantization.*deprecated",
    r"(?s).*quantized tensor creation functions.*deprecated",
)


def quantize_int8(model: GPT, inplace: bool = False) -> GPT:
    """An int8 copy of ``model`` for CPU inference (``model`` itself is left as it was).

    Every ``nn.Linear`` becomes ``torch.ao.nn.quantized.dynamic.Linear`` (int8 weights with
    per-output-channel scales; activations quantised dynamically); embeddings, LayerNorms and
    biases stay float32. The result works with :class:`medgpt.generation.Engine` (prefill
    through ``forward`` with a ``KVCache``, and ``decode_step``) and with
    :func:`medgpt.evaluation.score_documents`. ``inplace=True`` converts ``model`` itself
    instead of a copy (saves a float32 copy's memory when the original is not needed).

    CPU only: the quantised kernels have no CUDA implementation.
    """
    if not isinstance(model, GPT):
        raise TypeError(f"quantize_int8 takes a medgpt GPT, got {type(model).__name__}")
    if is_quantized(model):
        raise ValueError("the model is already quantised")
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ValueError(f"int8 quantisation is for CPU inference; the model is on {device}")
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        raise ValueError(f"quantize_int8 takes a float32 model, got {dtype}")
    target = model if inplace else copy.deepcopy(model)
    target.eval()
    # The head is tied to the embedding: give it its own Parameter first, so that replacing the
    # head module can never touch the embedding the lookups still use.
    target.lm_head.weight = nn.Parameter(target.lm_head.weight.detach(), requires_grad=False)
    with warnings.catch_warnings():
        for pattern in _DEPRECATIONS:
            warnings.filterwarnings("ignore", message=pattern)
        torch.ao.quantization.quantize_dynamic(
            target,
            {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig},
            dtype=torch.qint8,
            inplace=True,
        )
    for p in target.parameters():
        p.requires_grad_(False)
    return target


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` holds dynamically quantised linear layers."""
    return any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in model.modules())


def weight_bytes(model: GPT) -> dict[str, int]:
    """Bytes of weights one decode step at batch 1 reads, by kind.

    ``linear``: every linear layer's weight and bias, including the output head (the tied head
    counted once in a float32 model, as the embedding matrix it is); int8 weights at one byte
    each plus their per-channel scales and zero points (4 bytes each, as fbgemm stores them);
    biases stay float32. ``other``: LayerNorm weights and biases.
    The embedding lookups read two rows, which is left out.
    """
    linear = other = 0
    for module in model.modules():
        if isinstance(module, torch.ao.nn.quantized.dynamic.Linear):
            w, b = module._weight_bias()
            linear += w.numel() * w.element_size()
            if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                linear += 8 * w.shape[0]  # fbgemm keeps a float32 scale + int32 zero point
            if b is not None:
                linear += b.numel() * b.element_size()
        elif isinstance(module, (nn.Linear, SmallBatchLinear)):
            linear += sum(p.numel() * p.element_size() for p in module.parameters())
        elif isinstance(module, nn.LayerNorm):
            other += sum(p.numel() * p.element_size() for p in module.parameters())
    return {"linear": linear, "other": other, "total": linear + other}

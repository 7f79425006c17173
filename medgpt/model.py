"""The GPT-2 architecture as plain single-device PyTorch.

Learned position embeddings, pre-LayerNorm blocks, GELU (tanh approximation), weights shared
between the token embedding and the output head, and causal attention through
``F.scaled_dot_product_attention``. The forward pass takes an optional :class:`KVCache` so the
same module serves training (full sequences) and incremental decoding (one step at a time).

Parameter names follow OpenAI's original GPT-2 layout (``transformer.h.0.attn.c_attn``...), which
is also Hugging Face's; the only difference is that HF stores linear weights transposed (its
``Conv1D``), which :func:`load_hf_gpt2` and :func:`save_hf_gpt2` account for.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from medgpt.config import ConfigError, ModelConfig, from_mapping
from medgpt.errors import WeightsError
from medgpt.fastlinear import SmallBatchLinear, decode_attention


class KVCache:
    """Keys and values of past positions, preallocated for ``max_len`` positions.

    ``pos`` is the number of positions already cached; the model appends the new ones and
    advances it after the forward pass. One cache belongs to one batch of sequences that all
    have the same length.

    ``k[i]`` and ``v[i]`` are layer ``i``'s tensors of shape (batch, n_head, max_len, head_dim).
    One tensor per layer rather than one for the whole cache, so that :meth:`resize` can free
    each old layer as soon as it has been copied instead of holding two full caches at once.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.max_len = max_len or config.block_size
        if self.max_len > config.block_size:
            raise ValueError(f"max_len {self.max_len} exceeds block_size {config.block_size}")
        self.block_size = config.block_size
        shape = (batch_size, config.n_head, self.max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.pos = 0

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.k, *self.v))

    def reset(self) -> None:
        self.pos = 0

    def row(self, r: int) -> KVCache:
        """Row ``r`` as a one-sequence cache sharing this cache's memory: prefilling a new
        request through it writes straight into its slot of a running batch."""
        view = object.__new__(KVCache)
        view.max_len, view.pos, view.block_size = self.max_len, 0, self.block_size
        view.k = [t[r : r + 1] for t in self.k]
        view.v = [t[r : r + 1] for t in self.v]
        return view

    def move_row(self, src: int, dst: int) -> None:
        """Copy row ``src`` over row ``dst`` (keeps a batch's live rows contiguous)."""
        for t in (*self.k, *self.v):
            t[dst] = t[src]

    def resize(self, batch_size: int, max_len: int) -> int:
        """Reallocate for ``batch_size`` rows of ``max_len`` positions, keeping the leading
        rows and positions that still fit. Returns the most bytes the cache held at once while
        resizing: the larger of the old and new caches plus one layer tensor of the other."""
        if not 0 < max_len <= self.block_size:
            raise ValueError(f"max_len {max_len} not in [1, block_size {self.block_size}]")
        rows, keep = min(batch_size, self.batch_size), min(max_len, self.max_len)
        held = peak = self.nbytes
        for tensors in (self.k, self.v):
            for i, old in enumerate(tensors):
                new = old.new_empty((batch_size, old.shape[1], max_len, old.shape[3]))
                held += new.nbytes
                peak = max(peak, held)
                new[:rows, :, :keep] = old[:rows, :, :keep]
                # Zero what was not copied (written once, unlike zeros() then a copy): masked
                # positions still enter attention's weighted sum, where garbage NaNs would
                # survive a zero weight.
                new[rows:] = 0
                new[:rows, :, keep:] = 0
                tensors[i] = new
                held -= old.nbytes
                del old
        self.max_len = max_len
        return peak


class _DecodeRows:
    """Where each row's new token goes in a batched decode step, worked out once per step
    rather than once per layer: how many cache positions the step's attention reads, which of
    them each row may see, and the new entries' slots in a layer's cache.

    With ``fast`` (the model's linear layers are on the CPU decode kernel) attention goes to
    :func:`medgpt.fastlinear.decode_attention`, which needs only the positions."""

    def __init__(
        self, positions: torch.Tensor, last: int, n_head: int, max_len: int, fast: bool = False
    ) -> None:
        self.positions, self.n_head, self.max_len, self.fast = positions, n_head, max_len, fast
        self.length = last + 1  # last = int(positions.max())
        self.mask: torch.Tensor | None = None
        self.flat: torch.Tensor | None = None
        self._planned = False
        if not fast:
            self._plan()

    def _plan(self) -> None:
        # When every row is at the last position (a request alone, or rows in lockstep) each
        # sees all `length` positions: no mask (SDPA is faster without), and the new entries
        # are one column of the cache.
        self._planned = True
        positions, B = self.positions, self.positions.shape[0]
        if bool((positions != self.length - 1).any()):
            pos = torch.arange(self.length, device=positions.device)
            self.mask = (pos <= positions[:, None])[:, None, None, :]
            # Slots in a layer's cache viewed as (B * n_head * max_len, head_dim).
            row = torch.arange(B, device=positions.device)[:, None] * (self.n_head * self.max_len)
            head = torch.arange(self.n_head, device=positions.device)[None, :] * self.max_len
            self.flat = (row + head + positions[:, None]).reshape(-1)

    def write(self, cache: torch.Tensor, new: torch.Tensor) -> None:
        """Store ``new`` (B, n_head, head_dim) into ``cache`` (rows, n_head, max_len, head_dim)."""
        if not self._planned:
            self._plan()
        if self.flat is None:
            cache[: new.shape[0], :, self.length - 1] = new
        else:
            cache.view(-1, cache.shape[-1]).index_copy_(
                0, self.flat, new.reshape(-1, new.shape[-1])
            )

    def attend(
        self, qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> torch.Tensor:
        """The new keys and values of ``qkv`` (B, 3, n_head, head_dim) stored in the caches,
        and each row's attention over its own positions: (B, n_head, head_dim)."""
        if self.fast:
            y = decode_attention(qkv, k_cache, v_cache, self.positions)
            if y is not None:
                return y
        B = qkv.shape[0]
        self.write(k_cache, qkv[:, 1])  # plans the mask too, where fast had skipped it
        self.write(v_cache, qkv[:, 2])
        y = F.scaled_dot_product_attention(
            qkv[:, 0].unsqueeze(2),
            k_cache[:B, :, : self.length],
            v_cache[:B, :, : self.length],
            attn_mask=self.mask,
        )
        return y.squeeze(2)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor] | None,
        start: int,
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        mask = None
        is_causal = T > 1
        if cache is not None:
            k_cache, v_cache = cache
            k_cache[:, :, start : start + T] = k
            v_cache[:, :, start : start + T] = v
            k, v = k_cache[:, :, : start + T], v_cache[:, :, : start + T]
            if start > 0 and T > 1:
                # New queries see every cached position plus the new ones up to themselves;
                # SDPA's is_causal aligns the triangle to the top-left, which is wrong here.
                mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
                is_causal = False
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused kernel; HF's "gelu_new" spells the same formula out in ~8 elementwise ops.
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor] | None,
        start: int,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, start)
        return x + self.mlp(self.ln_2(x))

    def prefill(
        self,
        x: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        rows: list[int],
        lengths: list[int],
    ) -> torch.Tensor:
        """Several whole prompts packed into ``x`` (total tokens, n_embd), for
        :meth:`GPT.prefill`: the linear layers see every prompt's tokens at once, attention
        stays within each prompt, whose keys and values go to its own cache row."""
        attn = self.attn
        T, C = x.shape
        H = attn.n_head
        qkv = attn.c_attn(self.ln_1(x)).view(T, 3, H, C // H)
        ys, start = [], 0
        for row, n in zip(rows, lengths, strict=True):
            q, k, v = (qkv[start : start + n, j].transpose(0, 1) for j in range(3))
            k_cache[row, :, :n] = k
            v_cache[row, :, :n] = v
            # Attention reads the cache rows, as forward() does for a prompt alone.
            y = F.scaled_dot_product_attention(
                q.unsqueeze(0),
                k_cache[row : row + 1, :, :n],
                v_cache[row : row + 1, :, :n],
                is_causal=n > 1,
            )
            ys.append(y[0].transpose(0, 1).reshape(n, C))
            start += n
        return self._mlp_residual(x + attn.c_proj(torch.cat(ys)))

    def decode(
        self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, rows: _DecodeRows
    ) -> torch.Tensor:
        """One new position per row of ``x`` (B, n_embd), for :meth:`GPT.decode_step`: the
        same arithmetic as :meth:`forward` (without dropout) in fewer, cheaper tensor
        operations; each costs microseconds of dispatch, and at batch 1 they were a fifth of
        a decode step."""
        attn = self.attn
        B, C = x.shape
        qkv = attn.c_attn(self.ln_1(x)).view(B, 3, attn.n_head, C // attn.n_head)
        y = rows.attend(qkv, k_cache, v_cache)  # (B, n_head, head_dim)
        return self._mlp_residual(x + attn.c_proj(y.reshape(B, C)))

    def _mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        """``x + mlp(ln_2(x))`` as :meth:`forward` computes it, without the modules' dropout
        and call overhead (for :meth:`decode` and :meth:`prefill`)."""
        mlp = self.mlp
        return x + mlp.c_proj(F.gelu(mlp.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.vocab_size, config.n_embd),
                "wpe": nn.Embedding(config.block_size, config.n_embd),
                "drop": nn.Dropout(config.dropout),
                "h": nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                "ln_f": nn.LayerNorm(
                    config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias
                ),
            }
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        # GPT-2 scales the init of projections into the residual stream by 1/sqrt(2 * n_layer)
        # so the stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def features(self, idx: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """The final hidden states (B, T, n_embd), before the output head.

        Exposed so that callers scoring only some positions (evaluation) can apply the
        50257-wide head to those rows alone, in chunks, instead of materialising all logits.
        """
        T = idx.shape[1]
        start = kv_cache.pos if kv_cache is not None else 0
        limit = kv_cache.max_len if kv_cache is not None else self.config.block_size
        if start + T > limit:
            raise ValueError(f"sequence of {start + T} positions exceeds the context of {limit}")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            cache = (kv_cache.k[i], kv_cache.v[i]) if kv_cache is not None else None
            x = block(x, cache, start)
        if kv_cache is not None:
            kv_cache.pos = start + T
        return self.transformer.ln_f(x)

    def decode_step(
        self, idx: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache
    ) -> torch.Tensor:
        """Next-token logits (B, vocab) for one new token per sequence, where sequence b is
        row b of ``kv_cache`` and its token sits at ``positions[b]`` — sequences of different
        lengths decode together (continuous batching). ``kv_cache.pos`` is not used.

        Inference only: dropout is not applied, whatever the module's mode."""
        if idx.dim() != 1 or positions.shape != idx.shape:
            raise ValueError("decode_step takes idx and positions of shape (B,)")
        last = int(positions.max())  # one read back per step, shared with _DecodeRows
        if last >= kv_cache.max_len:
            raise ValueError(f"position {last} exceeds the cache of {kv_cache.max_len}")
        tr = self.transformer
        x = F.embedding(idx, tr.wte.weight) + F.embedding(positions, tr.wpe.weight)
        # The CPU decode kernel's attention goes with its linear layers (use_fast_linear).
        fast = isinstance(tr.h[0].attn.c_attn, SmallBatchLinear) if len(tr.h) else False
        rows = _DecodeRows(positions, last, self.config.n_head, kv_cache.max_len, fast)
        for i, block in enumerate(tr.h):
            x = block.decode(x, kv_cache.k[i], kv_cache.v[i], rows)
        return self.lm_head(tr.ln_f(x))

    def prefill(self, prompts: list[list[int]], rows: list[int], kv_cache: KVCache) -> torch.Tensor:
        """Last-position logits (len(prompts), vocab) for whole prompts, prompt i written into
        row ``rows[i]`` of ``kv_cache`` from position 0 — the admission of several requests
        in one pass. Their tokens are packed end to end (no padding) so that each weight
        matrix is read once for all of them; a row's numbers are those of a prompt alone
        wherever the linear layers give a row the same result in any batch (the CPU decode
        kernel does). The head runs on the last positions only: logits for every position
        would be another 200 MB for a 1,000-token prompt at GPT-2's vocabulary. Inference
        only: no dropout."""
        lengths = [len(p) for p in prompts]
        if not prompts or min(lengths) < 1 or len(rows) != len(prompts):
            raise ValueError("prefill takes one non-empty prompt per cache row")
        if max(lengths) > kv_cache.max_len:
            raise ValueError(
                f"prompt of {max(lengths)} tokens exceeds the cache of {kv_cache.max_len}"
            )
        tr = self.transformer
        device = tr.wte.weight.device
        idx = torch.tensor([t for p in prompts for t in p], device=device)
        pos = torch.cat([torch.arange(n, device=device) for n in lengths])
        x = F.embedding(idx, tr.wte.weight) + F.embedding(pos, tr.wpe.weight)
        for i, block in enumerate(tr.h):
            x = block.prefill(x, kv_cache.k[i], kv_cache.v[i], rows, lengths)
        last = torch.tensor(lengths, device=device).cumsum(0) - 1
        return self.lm_head(tr.ln_f(x[last]))

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for every position of ``idx`` (B, T) and, given ``targets``, the mean loss.

        ``targets`` are the next tokens (already shifted); ``-1`` marks positions not scored.
        With ``kv_cache``, ``idx`` holds only the new positions, which start at ``kv_cache.pos``.
        """
        logits = self.lm_head(self.features(idx, kv_cache))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1
            )
        return logits, loss

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters counted once (the tied head is the token embedding).

        ``non_embedding`` leaves out the position embeddings, the convention for FLOPs
        estimates: the token embedding stays in because it is also the output projection.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n


def count_params(config: ModelConfig, non_embedding: bool = True) -> int:
    """Parameter count from the config alone (no model needed); matches GPT.num_params."""
    E, L = config.n_embd, config.n_layer
    b = 1 if config.bias else 0
    # qkv, proj, fc, proj weights (+ their biases) and two LayerNorms (weight + bias)
    per_layer = 12 * E * E + b * 9 * E + 2 * E + b * 2 * E
    n = config.vocab_size * E + L * per_layer + (1 + b) * E  # + ln_f
    if not non_embedding:
        n += config.block_size * E
    return n


def flops_per_token(config: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs (forward + backward) per token: 6N plus the attention score/value matmuls.

    Follows the PaLM appendix B estimate, as nanoGPT does; the basis for MFU.
    """
    T = seq_len or config.block_size
    return 6 * count_params(config) + 12 * config.n_layer * config.n_embd * T


# --- Hugging Face GPT-2 weights ----------------------------------------------------------

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
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise WeightsError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        hf_config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(hf_config, dict):
        raise WeightsError(f"{cfg_path}: expected a JSON object, got {type(hf_config).__name__}")
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
    from medgpt.tokenizer import default_vocab_dir

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise WeightsError(f"{out} exists and is not empty (pass overwrite=True to replace it)")
    config_json = hf_config_dict(model.config)
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied: HF re-ties it from wte on load
        t = tensor.detach().to("cpu", torch.float32)
        if name.endswith(_TRANSPOSED):
            t = t.t()
        state[name] = t.contiguous()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        vocab = default_vocab_dir()
        shutil.copyfile(vocab / "encoder.json", tmp / "vocab.json")
        shutil.copyfile(vocab / "vocab.bpe", tmp / "merges.txt")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out

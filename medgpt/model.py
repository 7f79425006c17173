"""The GPT-2 architecture as plain single-device PyTorch.

Learned position embeddings, pre-LayerNorm blocks, GELU (tanh approximation), weights shared
between the token embedding and the output head, and causal attention through
``F.scaled_dot_product_attention``. The forward pass takes an optional
:class:`medgpt.kv_cache.KVCache` so the same module serves training (full sequences) and
incremental decoding (one step at a time); :meth:`GPT.decode_step` and :meth:`GPT.prefill` are
the continuous-batching engine's passes (:mod:`medgpt.generation`), which owns the cache's rows
and picks how a decode step attends (a :class:`medgpt.kv_cache.DecodeBackend`).

Parameter names follow OpenAI's original GPT-2 layout (``transformer.h.0.attn.c_attn``...), which
is also Hugging Face's; :mod:`medgpt.hf` converts from and to HF's GPT-2 folders.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from medgpt.config import ModelConfig

# KVCache is re-exported: it is what forward() takes, and `from medgpt.model import KVCache`
# is how callers have always found it.
from medgpt.kv_cache import SDPA, DecodeBackend, DecodePlan, KVCache

__all__ = ["GPT", "KVCache", "count_params", "flops_per_token"]


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
        # bool(): under torch.export (medgpt.export's ONNX graph) T is symbolic and SDPA takes
        # only a Python bool; bool() turns the comparison into a guard (the exporter assumes
        # T >= 2, and a one-token causal mask without a cache is the same as none).
        is_causal = bool(T > 1)
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
        self,
        x: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        rows: DecodePlan,
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
        # Training-time choice, not part of the model's shape (train.activation_checkpointing):
        # each block's activations are recomputed in backward instead of kept, trading about a
        # third more compute for activation memory of one block's inputs per layer.
        self.activation_checkpointing = False
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
        recompute = (
            self.activation_checkpointing
            and self.training
            and kv_cache is None
            and torch.is_grad_enabled()
        )
        for i, block in enumerate(self.transformer.h):
            if recompute:
                # Non-reentrant, with the RNG state kept: the recomputed dropout masks are the
                # ones of the forward, so the gradients are those without checkpointing.
                x = torch.utils.checkpoint.checkpoint(block, x, None, start, use_reentrant=False)
                continue
            cache = (kv_cache.k[i], kv_cache.v[i]) if kv_cache is not None else None
            x = block(x, cache, start)
        if kv_cache is not None:
            kv_cache.pos = start + T
        return self.transformer.ln_f(x)

    def decode_step(
        self,
        idx: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: KVCache,
        backend: DecodeBackend = SDPA,
    ) -> torch.Tensor:
        """Next-token logits (B, vocab) for one new token per sequence, where sequence b is
        row b of ``kv_cache`` and its token sits at ``positions[b]`` — sequences of different
        lengths decode together (continuous batching). ``kv_cache.pos`` is not used.

        ``backend`` is how each layer attends: :data:`medgpt.kv_cache.SDPA` (PyTorch's, any
        device and dtype) or :data:`medgpt.kv_cache.KERNEL` (the CPU kernel; the caller has
        checked it applies, as the Engine does). Inference only: dropout is not applied,
        whatever the module's mode."""
        if idx.dim() != 1 or positions.shape != idx.shape:
            raise ValueError("decode_step takes idx and positions of shape (B,)")
        last = int(positions.max())  # one read back per step, shared with the backend's plan
        if last >= kv_cache.max_len:
            raise ValueError(f"position {last} exceeds the cache of {kv_cache.max_len}")
        tr = self.transformer
        x = F.embedding(idx, tr.wte.weight) + F.embedding(positions, tr.wpe.weight)
        rows = backend.plan(positions, last, self.config.n_head, kv_cache.max_len)
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
        would be another 200 MB for a 1,000-token prompt at GPT-2's vocabulary (a caller that
        scores the prompts takes :meth:`prefill_features` instead). Inference only: no
        dropout."""
        x, lengths = self._prefill(prompts, rows, kv_cache)
        last = torch.tensor(lengths, device=x.device).cumsum(0) - 1
        return self.lm_head(self.transformer.ln_f(x[last]))

    def prefill_features(
        self, prompts: list[list[int]], rows: list[int], kv_cache: KVCache
    ) -> torch.Tensor:
        """:meth:`prefill`, but the final hidden states (ln_f applied, before the head) of
        every position of every prompt, packed end to end (total tokens, n_embd): for scoring
        the prompts, the caller applies the head to a few positions at a time. The same
        arithmetic as :meth:`prefill` (LayerNorm works row by row), whose logits are
        ``lm_head`` of the last position of each prompt."""
        x, _ = self._prefill(prompts, rows, kv_cache)
        return self.transformer.ln_f(x)

    def _prefill(
        self, prompts: list[list[int]], rows: list[int], kv_cache: KVCache
    ) -> tuple[torch.Tensor, list[int]]:
        """The blocks over the packed prompts: the last hidden states (total tokens, n_embd),
        before ln_f, and each prompt's length."""
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
        return x, lengths

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

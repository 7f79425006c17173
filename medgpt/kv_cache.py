"""The KV cache and the bookkeeping of continuous batching, for :mod:`medgpt.generation`.

:class:`KVCache` holds every layer's keys and values. The model's forward passes only read
and write its tensors and ``pos``; the row management (a request's row as a cache of its own,
rows moved together when a request leaves, the cache resized as requests come and go) is the
engine's, and so is the choice of how a decode step attends: a :class:`DecodeBackend` that the
engine hands to :meth:`medgpt.model.GPT.decode_step` (:data:`SDPA`, PyTorch's attention with a
mask, or :data:`KERNEL`, medgpt's CPU kernel).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from medgpt import kernels
from medgpt.config import ModelConfig

__all__ = ["KERNEL", "SDPA", "DecodeBackend", "DecodePlan", "DecodeRows", "KVCache"]


class KVCache:
    """Keys and values of past positions, preallocated for ``max_len`` positions.

    ``pos`` is the number of positions already cached; the model appends the new ones and
    advances it after the forward pass. One cache belongs to one batch of sequences that all
    have the same length (or, for :meth:`GPT.decode_step` and :meth:`GPT.prefill`, to a
    continuous batch whose rows each have their own).

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


class DecodePlan(Protocol):
    """One decode step's attention, planned once for all layers by a :class:`DecodeBackend`."""

    def attend(
        self, qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> torch.Tensor:
        """Store the new keys and values of ``qkv`` (B, 3, n_head, head_dim) in the layer's
        caches and return each row's attention over its own positions (B, n_head, head_dim)."""
        ...


class DecodeRows:
    """Where each row's new token goes in a batched decode step (SDPA), worked out once per
    step rather than once per layer: how many cache positions the step's attention reads,
    which of them each row may see, and the new entries' slots in a layer's cache."""

    def __init__(self, positions: torch.Tensor, last: int, n_head: int, max_len: int) -> None:
        self.positions, self.n_head, self.max_len = positions, n_head, max_len
        self.length = last + 1  # last = int(positions.max())
        self.mask: torch.Tensor | None = None
        self.flat: torch.Tensor | None = None
        # When every row is at the last position (a request alone, or rows in lockstep) each
        # sees all `length` positions: no mask (SDPA is faster without), and the new entries
        # are one column of the cache.
        B = positions.shape[0]
        if bool((positions != self.length - 1).any()):
            pos = torch.arange(self.length, device=positions.device)
            self.mask = (pos <= positions[:, None])[:, None, None, :]
            # Slots in a layer's cache viewed as (B * n_head * max_len, head_dim).
            row = torch.arange(B, device=positions.device)[:, None] * (n_head * max_len)
            head = torch.arange(n_head, device=positions.device)[None, :] * max_len
            self.flat = (row + head + positions[:, None]).reshape(-1)

    def write(self, cache: torch.Tensor, new: torch.Tensor) -> None:
        """Store ``new`` (B, n_head, head_dim) into ``cache`` (rows, n_head, max_len, head_dim)."""
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
        B = qkv.shape[0]
        self.write(k_cache, qkv[:, 1])
        self.write(v_cache, qkv[:, 2])
        y = F.scaled_dot_product_attention(
            qkv[:, 0].unsqueeze(2),
            k_cache[:B, :, : self.length],
            v_cache[:B, :, : self.length],
            attn_mask=self.mask,
        )
        return y.squeeze(2)


class _KernelRows:
    """A decode step's rows for :func:`medgpt.kernels.decode_attention`, which needs only
    the positions (no mask, no slots: the kernel writes and reads each row's own)."""

    def __init__(self, positions: torch.Tensor) -> None:
        self.positions = positions

    def attend(
        self, qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> torch.Tensor:
        return kernels.decode_attention(qkv, k_cache, v_cache, self.positions)


class DecodeBackend:
    """How :meth:`medgpt.model.GPT.decode_step` attends: :meth:`plan` is called once per step
    with the rows' positions and returns what each layer's ``attend(qkv, k_cache, v_cache)``
    goes through."""

    name = "sdpa"

    def plan(self, positions: torch.Tensor, last: int, n_head: int, max_len: int) -> DecodePlan:
        return DecodeRows(positions, last, n_head, max_len)

    def __repr__(self) -> str:
        return f"<decode backend {self.name}>"


class _KernelBackend(DecodeBackend):
    name = "kernel"

    def plan(self, positions: torch.Tensor, last: int, n_head: int, max_len: int) -> DecodePlan:
        return _KernelRows(positions)


# PyTorch's scaled_dot_product_attention with a mask over the longest row: any device, dtype
# and autograd mode.
SDPA = DecodeBackend()
# torch.ops.medgpt.decode_attention: contiguous float32 on the CPU, no autograd, and the
# kernels available (medgpt.kernels.available()); the Engine picks it with the kernel's
# linear layers.
KERNEL = _KernelBackend()

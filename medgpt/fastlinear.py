"""A faster float32 linear layer for decoding on the CPU.

While decoding, every linear layer multiplies a few rows of activations (one per running
request) by its whole weight matrix, so each step reads all the weights once and does little
arithmetic on them. PyTorch sends those products to MKL, which on this project's machines
(2-core AVX2, torch 2.13) runs them on one core: one row reads the weights at ~11 GB/s of the
~18 GB/s the two cores reach together, and two to sixteen rows take two to three times as long
as one (MKL's small-M sgemm path). ``csrc/small_linear.c`` is a plain AVX2/FMA kernel for
exactly that shape: the weight rows split between OpenMP threads, each block of four rows read
once and used for every row of the input while it sits in L1.
``bench/serve_engine.py`` measures what that does to decoding.

``csrc/decode_attention.c`` (:func:`decode_attention`) is the decode step's attention for a
continuous batch, each row over its own positions; :meth:`medgpt.model.GPT.decode_step` uses
it whenever the model's layers are swapped for the kernel. At 8 rows of GPT-2 124M it made a
step 1.14x faster than SDPA with a mask, 1.08x at 1 row (``bench/serve_decode_step.py``).

The kernel is compiled on first use with the system's C compiler (``$CC``, else ``cc``) into a
per-user cache (``$MEDGPT_KERNEL_CACHE``, else ``~/.cache/medgpt/kernels``), named by a hash of
the source and flags, so it is built once per machine. It links the OpenMP runtime torch
already loaded, so both share one thread pool. Where it cannot be had (no compiler, not x86-64
with AVX2 and FMA, a failed build), :func:`kernel` returns None with the reason in
:func:`unavailable_reason` and everything stays on ``F.linear`` and SDPA.

A row's result does not depend on how many other rows are in the call (each dot product is
summed in the same order whatever M is), so batching requests does not change their tokens.
Results differ from ``F.linear``'s by float32 rounding only (~1e-6 relative).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "MAX_ROWS",
    "SmallBatchLinear",
    "decode_attention",
    "kernel",
    "restore_linear",
    "unavailable_reason",
    "use_fast_linear",
    "uses_fast_linear",
]

# Rows (all leading dimensions together) up to which the kernel is used. On this project's
# 2-core AMD EPYC (AVX2) it beat MKL's sgemm over GPT-2 124M's matrices at every row count
# tried, 1 to 512: 1.7x at 1 row, 2.7x at 8, 1.7x at 32, 1.3x at 128, even at 512; MKL picks
# weaker code paths on AMD. 128 covers decoding and the prefill of most prompts; beyond, the
# work is a real matrix multiplication, where a blocked sgemm (and AVX-512 where there is
# one) is the safer default.
MAX_ROWS = 128

# Built together into one library: the linear kernel and the decode step's attention.
_SOURCES = tuple(
    Path(__file__).with_name("csrc") / n for n in ("small_linear.c", "decode_attention.c")
)
_FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_has_avx2_fma() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in flags.splitlines():
        if line.startswith("flags"):
            words = set(line.split(":", 1)[1].split())
            return {"avx2", "fma"} <= words
    return False


def _cache_dir() -> Path:
    root = os.environ.get("MEDGPT_KERNEL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "medgpt" / "kernels"


def _build() -> tuple[ctypes._CFuncPtr | None, str | None]:
    if os.environ.get("MEDGPT_FAST_LINEAR", "1") == "0":
        return None, "disabled by MEDGPT_FAST_LINEAR=0"
    if not _cpu_has_avx2_fma():
        return None, "this CPU is not x86-64 with AVX2 and FMA"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return None, "no C compiler found (set CC)"
    source = b"".join(src.read_bytes() for src in _SOURCES)
    tag = hashlib.sha256(source + " ".join(_FLAGS).encode()).hexdigest()[:16]
    target = _cache_dir() / f"medgpt_kernels-{tag}.so"
    names = ", ".join(src.name for src in _SOURCES)
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            # Built under a temporary name and renamed: another process loading the library
            # at the same moment sees either no file or a whole one.
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
            os.close(fd)
        except OSError as e:
            return (
                None,
                f"cannot write the kernel cache {target.parent} ({e}); set MEDGPT_KERNEL_CACHE",
            )
        try:
            proc = subprocess.run(
                [cc, *_FLAGS, "-o", tmp, *map(str, _SOURCES)],
                capture_output=True,
                text=True,
                timeout=120,
            )
            if proc.returncode != 0:
                return None, f"{cc} failed to build {names}: {proc.stderr.strip()[-500:]}"
            os.replace(tmp, target)
        except (OSError, subprocess.TimeoutExpired) as e:
            return None, f"building {names} failed: {e}"
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    try:
        lib = ctypes.CDLL(str(target))
        fn, attn = lib.medgpt_small_linear, lib.medgpt_decode_attention
    except (OSError, AttributeError) as e:
        return None, f"loading {target} failed: {e}"
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    fn.restype = None
    attn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 4 + [ctypes.c_float, ctypes.c_int]
    attn.restype = ctypes.c_int
    _state["attn"] = attn
    return fn, None


def kernel() -> ctypes._CFuncPtr | None:
    """The compiled kernel, built on first call; None where it cannot be had."""
    with _lock:
        if "fn" not in _state:
            _state["fn"], _state["reason"] = _build()
        return _state["fn"]  # type: ignore[return-value]


def unavailable_reason() -> str | None:
    """Why :func:`kernel` is None (None when it is available)."""
    kernel()
    return _state["reason"]  # type: ignore[return-value]


def decode_attention(
    qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor | None:
    """One decode step's attention for a batch whose rows sit at different positions, with
    ``csrc/decode_attention.c``: row b's new key and value (``qkv[b, 1]``, ``qkv[b, 2]``) are
    written at ``positions[b]`` of cache row b, and its query ``qkv[b, 0]`` attends over
    positions 0..positions[b] of that row. ``qkv`` is (B, 3, n_head, head_dim), the caches
    (rows, n_head, max_len, head_dim). Returns (B, n_head, head_dim), or None (nothing
    written) where the kernel does not apply: no kernel, autograd on, not contiguous float32
    on the CPU. What SDPA with a mask over the longest row computes, to float32 rounding.
    A position outside the cache raises ValueError, before anything is written."""
    if "fn" not in _state:
        kernel()
    attn = _state.get("attn")
    B, three, H, D = qkv.shape
    if (
        attn is None
        or three != 3
        or torch.is_grad_enabled()
        or not (qkv.is_cpu and k_cache.is_cpu and v_cache.is_cpu and positions.is_cpu)
        or not (qkv.dtype == k_cache.dtype == v_cache.dtype == torch.float32)
        or positions.dtype != torch.int64
        or k_cache.shape != v_cache.shape
        or k_cache.shape[0] < B
        or k_cache.shape[1] != H
        or k_cache.shape[3] != D
        or positions.shape != (B,)
        or not (qkv.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous())
        or not positions.is_contiguous()
    ):
        return None
    y = torch.empty((B, H, D))
    status = attn(
        qkv.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        positions.data_ptr(),
        y.data_ptr(),
        B,
        H,
        k_cache.shape[2],
        D,
        D**-0.5,
        torch.get_num_threads(),
    )
    if status == -2:
        raise ValueError(f"decode_attention: positions must be in 0..{k_cache.shape[2] - 1}")
    if status != 0:
        raise MemoryError("decode_attention: no memory for its scratch buffer")
    return y


class SmallBatchLinear(nn.Module):
    """An ``nn.Linear`` whose forward uses the kernel for a contiguous float32 input on the
    CPU of at most :data:`MAX_ROWS` rows (all leading dimensions together) with autograd off, and
    ``F.linear`` for everything else (training, prefill, other devices and dtypes). It shares
    the original layer's Parameters: a tied weight stays tied."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Few, cheap checks: a decode step at batch 1 makes 49 of these calls, and at GPT-2
        # 124M their overhead was a tenth of the step. What does not pass goes to F.linear.
        w, b, fn = self.weight, self.bias, _state.get("fn")
        if (
            fn is not None
            and x.is_cpu
            and x.dtype == torch.float32
            and not torch.is_grad_enabled()
            and x.shape[-1] == self.in_features  # else F.linear raises the usual error
            and x.numel() <= MAX_ROWS * self.in_features
            and x.is_contiguous()
            and w.dtype == torch.float32
            and w.is_contiguous()
            and (b is None or b.is_contiguous())
        ):
            y = torch.empty((*x.shape[:-1], self.out_features))
            # fn is looked up per call rather than held by the module: a ctypes pointer would
            # make the model impossible to deepcopy or pickle.
            fn(
                x.data_ptr(),
                w.data_ptr(),
                None if b is None else b.data_ptr(),
                y.data_ptr(),
                x.numel() // self.in_features,
                self.in_features,
                self.out_features,
                torch.get_num_threads(),
            )
            return y
        return F.linear(x, w, b)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}"
        )


def use_fast_linear(model: nn.Module) -> int:
    """Swap every ``nn.Linear`` of ``model`` (in place) for :class:`SmallBatchLinear`; returns
    how many were swapped, 0 when the kernel is unavailable (then nothing changes)."""
    if kernel() is None:
        return 0
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, SmallBatchLinear(child))
                swapped += 1
    return swapped


def uses_fast_linear(model: nn.Module) -> bool:
    """Whether any layer of ``model`` is a :class:`SmallBatchLinear`."""
    return any(isinstance(m, SmallBatchLinear) for m in model.modules())


def restore_linear(model: nn.Module) -> int:
    """Undo :func:`use_fast_linear` in place (plain ``nn.Linear`` layers sharing the same
    Parameters); returns how many layers were restored."""
    restored = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, SmallBatchLinear):
                linear = nn.Linear(child.in_features, child.out_features, bias=False, device="meta")
                linear.weight, linear.bias = child.weight, child.bias
                setattr(module, name, linear)
                restored += 1
    return restored

"""medgpt's float32 CPU decode kernels, as PyTorch operators.

While decoding, every linear layer multiplies a few rows of activations (one per running
request) by its whole weight matrix, so each step reads all the weights once and does little
arithmetic on them. PyTorch sends those products to MKL, which on this project's machines
(2-core AMD EPYC, torch 2.13) runs them on one core: one row reads the weights at ~11 GB/s of
the ~18 GB/s the two cores reach together, and two to sixteen rows take two to three times as
long as one (MKL's small-M sgemm path). ``small_linear.h`` is a plain AVX2/FMA kernel for
exactly that shape: the weight rows split between OpenMP threads, each block of four rows read
once and used for every row of the input while it sits in L1. ``decode_attention.h`` is the
decode step's attention for a continuous batch, each row over its own positions (1.14x a step
over SDPA with a mask at 8 rows of GPT-2 124M, ``bench/serve_decode_step.py``).

``ops.cpp`` registers them as ``torch.ops.medgpt.small_linear(x, weight, bias)`` and
``torch.ops.medgpt.decode_attention(qkv, k_cache, v_cache, positions)``, and checks every
tensor in C++ (device, dtype, contiguity, shapes, positions) before it touches memory: a bad
call is a RuntimeError that names the argument, and writes nothing.

The library is compiled on first use with the system's C++ compiler (``$CXX``, else ``c++``)
against torch's headers into a per-user cache (``$MEDGPT_KERNEL_CACHE``, else
``~/.cache/medgpt/kernels``), named by a hash of the sources, the flags and torch's version,
so it is built once per machine and torch (~11 s here). It links the OpenMP runtime torch
already loaded, so both share one thread pool. Where it cannot be had (``MEDGPT_KERNELS=off``,
no compiler, not x86-64 with AVX2 and FMA, a failed build, an unwritable cache, a cached
library that does not load),
:func:`available` is False with the reason in :func:`unavailable_reason`, and everything stays
on ``F.linear`` and SDPA.

A row's result does not depend on how many other rows are in the call (each dot product is
summed in the same order whatever M is), so batching requests does not change their tokens.
Results differ from ``F.linear``'s by float32 rounding only (~1e-6 relative).
"""

from __future__ import annotations

import copy
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "MAX_ROWS",
    "SmallBatchLinear",
    "available",
    "decode_attention",
    "library_path",
    "shared_tree",
    "small_linear",
    "unavailable_reason",
    "uses_kernel_linears",
    "with_kernel_linears",
    "with_plain_linears",
]

# Rows (all leading dimensions together) up to which SmallBatchLinear uses the kernel. On this
# project's 2-core AMD EPYC it beat MKL's sgemm over GPT-2 124M's matrices at every row count
# tried, 1 to 512: 1.7x at 1 row, 2.7x at 8, 1.7x at 32, 1.3x at 128, even at 512; MKL picks
# weaker code paths on AMD. 128 covers decoding and the prefill of most prompts; beyond, the
# work is a real matrix multiplication, where a blocked sgemm is the safer default.
MAX_ROWS = 128

_DIR = Path(__file__).parent
_SOURCE = _DIR / "ops.cpp"
_HEADERS = (_DIR / "small_linear.h", _DIR / "decode_attention.h")
# c++20: torch 2.13's headers use C++20 features. The ABI define must match torch's build or
# std::string arguments in c10's signatures fail to link.
_FLAGS = (
    "-O3",
    "-mavx2",
    "-mfma",
    "-fopenmp",
    "-shared",
    "-fPIC",
    "-std=c++20",
    f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
)
_OFF = ("0", "off", "false", "no")
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


def _disabled() -> str | None:
    setting = os.environ.get("MEDGPT_KERNELS", "").strip().lower()
    if setting in _OFF:
        return f"disabled by MEDGPT_KERNELS={os.environ['MEDGPT_KERNELS']}"
    # The name the setting had before the kernels were torch operators; still honoured.
    if os.environ.get("MEDGPT_FAST_LINEAR") == "0":
        return "disabled by MEDGPT_FAST_LINEAR=0"
    return None


def _compile(cxx: str, target: Path) -> str | None:
    """Build the library into ``target``; None on success, else why not."""
    from torch.utils.cpp_extension import include_paths

    torch_lib = Path(torch.__file__).parent / "lib"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Built under a temporary name and renamed: another process loading the library at
        # the same moment sees either no file or a whole one.
        fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=target.parent)
        os.close(fd)
    except OSError as e:
        return f"cannot write the kernel cache {target.parent} ({e}); set MEDGPT_KERNEL_CACHE"
    command = [
        cxx,
        *_FLAGS,
        *(f"-I{p}" for p in include_paths()),
        "-o",
        tmp,
        str(_SOURCE),
        f"-L{torch_lib}",
        "-lc10",
        "-ltorch_cpu",
        f"-Wl,-rpath,{torch_lib}",
    ]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            return f"{cxx} failed to build {_SOURCE.name}: {proc.stderr.strip()[-500:]}"
        os.replace(tmp, target)
        return None
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"building {_SOURCE.name} failed: {e}"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def library_path() -> Path:
    """Where the built library is cached: named by a hash of the sources, the flags and torch's
    version, so that a change to any of them builds a new one."""
    source = b"".join(p.read_bytes() for p in (_SOURCE, *_HEADERS))
    key = source + " ".join(_FLAGS).encode() + torch.__version__.encode()
    return _cache_dir() / f"medgpt_kernels-{hashlib.sha256(key).hexdigest()[:16]}.so"


def _load() -> str | None:
    """Build (when not cached) and load the operators; None on success, else why not."""
    off = _disabled()
    if off:
        return off
    if not _cpu_has_avx2_fma():
        return "this CPU is not x86-64 with AVX2 and FMA"
    target = library_path()
    if not target.exists():
        # The compiler is needed only to build: a cached library loads without one.
        cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
        if not cxx:
            return "no C++ compiler found (set CXX)"
        failed = _compile(cxx, target)
        if failed:
            return failed
    try:
        torch.ops.load_library(str(target))
        _state["linear"] = torch.ops.medgpt.small_linear.default
        _state["attention"] = torch.ops.medgpt.decode_attention.default
    except (OSError, RuntimeError, AttributeError) as e:
        return f"loading {target} failed: {e}"
    return None


def available() -> bool:
    """Whether the operators are loaded, building them on the first call."""
    with _lock:
        if "reason" not in _state:
            _state["reason"] = _load()
        return _state["reason"] is None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True)."""
    available()
    return _state["reason"]  # type: ignore[return-value]


def _op(name: str) -> Callable[..., torch.Tensor]:
    if not available():
        raise RuntimeError(f"medgpt's CPU kernels are unavailable: {unavailable_reason()}")
    return _state[name]  # type: ignore[return-value]


def small_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with the kernel (``torch.ops.medgpt.small_linear``):
    contiguous float32 CPU tensors, any leading shape of ``x``. RuntimeError otherwise, or
    when the kernels are unavailable. No autograd."""
    return _op("linear")(x, weight, bias)


def decode_attention(
    qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """One decode step's attention for a batch whose rows sit at different positions
    (``torch.ops.medgpt.decode_attention``): row b's new key and value (``qkv[b, 1]``,
    ``qkv[b, 2]``) are written at ``positions[b]`` of cache row b, and its query ``qkv[b, 0]``
    attends over positions 0..positions[b] of that row. ``qkv`` is (B, 3, n_head, head_dim),
    the caches (rows >= B, n_head, max_len, head_dim), all contiguous float32 on the CPU;
    ``positions`` int64 (B,). Returns (B, n_head, head_dim): what SDPA with a mask over the
    longest row computes, to float32 rounding. Anything else (a position outside the cache
    included) is a RuntimeError raised before anything is written. No autograd."""
    return _op("attention")(qkv, k_cache, v_cache, positions)


class SmallBatchLinear(nn.Module):
    """An ``nn.Linear`` whose forward uses the kernel for a contiguous float32 input on the
    CPU of at most :data:`MAX_ROWS` rows (all leading dimensions together) with autograd off, and
    ``F.linear`` for everything else (training, long prefills, other devices and dtypes). It
    holds the original layer's Parameters: a tied weight stays tied."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Few, cheap checks: a decode step at batch 1 makes 49 of these calls, and at GPT-2
        # 124M their overhead was a tenth of the step. What does not pass goes to F.linear;
        # what passes, the operator checks again in C++.
        w, b, op = self.weight, self.bias, _state.get("linear")
        if (
            op is not None
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
            # Looked up per call rather than held by the module, which stays plain to copy
            # and pickle.
            return op(x, w, b)  # type: ignore[operator]
        return F.linear(x, w, b)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}"
        )


M = TypeVar("M", bound=nn.Module)


def shared_tree(module: M, replace: Callable[[nn.Module], nn.Module | None] | None = None) -> M:
    """A new module tree of the same classes over the very same Parameters and buffers (no
    tensor is copied), ``module`` itself left as it was: changing the copy's structure or
    mode (``eval()``, swapped layers) does not touch the original. ``replace(m)`` may return
    a module to stand in for ``m`` and its subtree in the copy (None keeps it). A module that
    appears twice appears twice in the copy as one object."""
    memo: dict[int, nn.Module] = {}

    def visit(m: nn.Module) -> nn.Module:
        if id(m) in memo:
            return memo[id(m)]
        new = replace(m) if replace is not None else None
        if new is None:
            new = copy.copy(m)  # same attribute values; the containers are renewed below
            for name, value in list(vars(new).items()):
                if isinstance(value, (dict, set, list)):
                    # _parameters, _buffers, _modules, hook tables: the copy's own containers
                    # holding the same tensors and functions.
                    vars(new)[name] = copy.copy(value)
            for name, child in m._modules.items():
                new._modules[name] = None if child is None else visit(child)
        memo[id(m)] = new
        return new

    return visit(module)  # type: ignore[return-value]


def _kernel_linear(m: nn.Module) -> nn.Module | None:
    return SmallBatchLinear(m) if type(m) is nn.Linear else None  # type: ignore[arg-type]


def with_kernel_linears(model: M) -> M:
    """``model``'s module tree with every ``nn.Linear`` as a :class:`SmallBatchLinear` over the
    same Parameters (see :func:`shared_tree`: nothing is copied, ``model`` is unchanged).
    Where the kernels are unavailable, the copy keeps plain ``nn.Linear`` layers."""
    return shared_tree(model, _kernel_linear if available() else None)


def _plain_linear(m: nn.Module) -> nn.Module | None:
    if not isinstance(m, SmallBatchLinear):
        return None
    # Built on the meta device: no weight is allocated before the real Parameters go in.
    linear = nn.Linear(m.in_features, m.out_features, bias=False, device="meta")
    linear.weight, linear.bias = m.weight, m.bias
    return linear


def with_plain_linears(model: M) -> M:
    """``model``'s module tree with every :class:`SmallBatchLinear` as a plain ``nn.Linear``
    over the same Parameters (:func:`shared_tree`: nothing copied, ``model`` unchanged)."""
    return shared_tree(model, _plain_linear)


def uses_kernel_linears(model: nn.Module) -> bool:
    """Whether any layer of ``model`` is a :class:`SmallBatchLinear`."""
    return any(isinstance(m, SmallBatchLinear) for m in model.modules())

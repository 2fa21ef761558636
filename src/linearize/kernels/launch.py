"""Triton launches with less host time: `fast(kernel)[grid](*args, **kwargs)` as `kernel[grid](...)`.

Triton's own launch path spends 18-60 us of host time a call on an H200 host, more for kernels
with more arguments: it binds them, builds and hashes the specialisation key and checks the
kernel's globals, then runs its launcher. A small model's training step makes hundreds of these
calls and waits on them (docs/kernels.md, sixteenth session). The first launch of each
specialisation goes through Triton, which compiles it and returns the compiled kernel; later
launches with the same key call that compiled kernel directly.

The key is at least as fine as Triton's specialisation, so it never reuses a binary compiled for
other arguments: each tensor's dtype and whether its address is 16-byte aligned; each integer's
width class, whether it is 1 and whether it divides by 16; each bool and None as itself; floats
by type (Triton does not specialise them); the keyword arguments (constexprs, launch options)
by value; the current device. Anything else (a callable grid, another argument type, the
interpreter's kernels) takes Triton's path every time, as does every launch while ENABLED is
False.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

try:
    from triton.compiler.compiler import CompiledKernel
    from triton.runtime.jit import JITFunction
except ImportError:  # pragma: no cover - a Triton without these: Triton's path always
    CompiledKernel = JITFunction = None

# LINEARIZE_FAST_LAUNCH=0: every launch through Triton's own path (A/B timing, debugging); benchmarks flip it
ENABLED = os.environ.get("LINEARIZE_FAST_LAUNCH") != "0"
_INT32 = 2**31
_UINT64 = 2**64


def _arg_key(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.dtype, x.data_ptr() % 16 == 0
    if isinstance(x, bool) or x is None:
        return x
    if isinstance(x, int):
        width = 32 if -_INT32 <= x < _INT32 else 64 if -(2**63) <= x < 2**63 else 65 if x < _UINT64 else None
        return width, x == 1, x % 16 == 0
    if isinstance(x, float):
        return float
    raise TypeError  # not a kind the key covers: Triton's path


class FastLaunch:
    """One kernel's launches: Triton's path on a key's first launch, its compiled kernel after."""

    def __init__(self, kernel):
        self.kernel = kernel
        params = getattr(kernel, "params", ())
        self.arg_names = tuple(p.name for p in params)
        self.constexpr = tuple(bool(p.is_constexpr) for p in params)  # keyed by value, as Triton does
        self.compiled: dict[tuple, Any] = {}
        # the interpreter's kernels (TRITON_INTERPRET=1) are not JITFunctions and compile nothing
        self.direct = JITFunction is not None and isinstance(kernel, JITFunction)

    def __getitem__(self, grid):
        return functools.partial(self.launch, grid)

    def launch(self, grid, *args, **kwargs):
        if not (self.direct and ENABLED) or callable(grid) or len(args) > len(self.arg_names):
            return self.kernel[grid](*args, **kwargs)
        try:
            key = (tuple(a if const else _arg_key(a) for a, const in zip(args, self.constexpr, strict=False)),
                   tuple(kwargs.items()), torch.cuda.current_device())
            hit = self.compiled.get(key)  # hashing a constexpr may fail too
        except TypeError:
            return self.kernel[grid](*args, **kwargs)
        if hit is None:  # Triton binds, compiles (or finds its cached binary) and launches
            kernel = self.kernel[grid](*args, **kwargs)
            names = self.arg_names[len(args):]
            if isinstance(kernel, CompiledKernel) and all(n in kwargs for n in names):
                self.compiled[key] = (kernel, names)
            return kernel
        kernel, names = hit
        grid = (*grid, 1, 1)[:3]
        kernel[grid](*args, *(kwargs[n] for n in names))  # the bound arguments, constexprs included
        return kernel


@functools.cache
def fast(kernel) -> FastLaunch:
    """The cached-launch form of a @triton.jit kernel (one per kernel)."""
    return FastLaunch(kernel)

"""Every Triton kernel builds for a real GPU (sm_90), not only under the interpreter.

The interpreter runs any tile shape; the compiler does not (tl.dot's minimum sizes, shared
memory, registers). benchmarks/kernel_registers.py compiles ahead of time with the ptxas that
ships in the Triton wheel, so this runs on a machine without a GPU. The spill bound is coarse on
purpose (spills depend on the Triton version): it catches a kernel that keeps whole tiles in local
memory, as the first window backward did (3.7 KB per thread).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
TOOL = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_registers.py"
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def load_tool():
    spec = importlib.util.spec_from_file_location("kernel_registers", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not CUOBJDUMP.exists(), reason="this Triton wheel ships no CUDA toolchain")
def test_every_kernel_compiles_for_sm90_without_heavy_spills():
    tool = load_tool()
    for label, kernel, constexprs, warps, stages, *types in tool.configs(64, 4, 2):
        report = tool.compile_report(kernel, constexprs, "bf16", 90, warps, stages, *types)
        assert report["registers"] and report["registers"] <= 255, label
        assert report["stack_bytes"] < 1024, (label, report)

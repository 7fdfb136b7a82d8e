"""The CPU kernel level, pinned so that a run gives the same numbers on every x86 machine.

torch, MKL and oneDNN each pick their fastest kernels for the CPU they find (AVX-512 where present, else AVX2), and
those kernels round differently; the tiny models the embedded default trains from scratch amplify the differences
until an AVX-512 machine prints other accuracies than the committed results (docs/results, README). Pinning every
library to its AVX2 kernels makes the numbers equal across machines that have AVX2 (every x86 server CPU since
2013). The libraries read these variables once, when they first load, so `pin()` must run before torch is imported:
`dxrag`'s entry point and the test suite's conftest call it first; subprocesses and torchrun workers inherit it.

`DXRAG_CPU_KERNELS=native` turns the pin off (each library picks for itself; faster on AVX-512, numbers differ from
the committed ones). A variable the user set explicitly is never overridden. Imports neither torch nor numpy.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Any, MutableMapping

ENV = "DXRAG_CPU_KERNELS"
DEFAULT = "avx2"
# What each level sets, measured on an AVX-512 machine (docs/design.md, "Reproducible numbers"): ATen's kernels,
# MKL's and oneDNN's each change a run's scores on their own (~1e-7); numpy's AVX-512 loops change float64
# probabilities in the last bit; OpenBLAS's core type changed nothing and is left alone. NPY_DISABLE_CPU_FEATURES
# names both numpy 2.4's feature groups and the older names; names a numpy does not know are ignored.
_NUMPY_AVX512 = "X86_V4 AVX512F AVX512CD AVX512_SKX AVX512_CLX AVX512_CNL AVX512_ICL AVX512_SPR"
LEVELS: dict[str, dict[str, str]] = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "NPY_DISABLE_CPU_FEATURES": _NUMPY_AVX512},
    "native": {},
}


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


_PINNED: dict[str, str] = {}  # the level this process pinned (a second call at the same level is no news)


def pin(environ: MutableMapping[str, str] | None = None) -> str:
    """Set the variables of the level `DXRAG_CPU_KERNELS` names (default avx2) where they are not set yet, and
    export the level so child processes pin the same; returns the level. Call it before torch is imported: after
    that, a warning says the pin may not take effect in this process."""
    env = os.environ if environ is None else environ
    level = (env.get(ENV) or DEFAULT).strip().lower()
    if level not in LEVELS:
        raise SystemExit(f"dxrag: error: {ENV}={env.get(ENV)!r}: expected one of {', '.join(LEVELS)}")
    env[ENV] = level
    if _x86():
        for name, value in LEVELS[level].items():
            env.setdefault(name, value)
    late = [m for m in ("torch", "numpy") if m in sys.modules]
    if environ is None and LEVELS[level] and late and _PINNED.get("level") != level:
        import warnings

        warnings.warn(f"{ENV}={level}: {' and '.join(late)} imported before the CPU kernel level was pinned; this "
                      f"process may run their native kernels", RuntimeWarning, stacklevel=2)
    if environ is None:
        _PINNED["level"] = level
    return level


def configure_torch() -> None:
    """What the pinned level sets inside torch, once it is imported (no variable reaches it): torch's oneDNN backend
    off, so convolutions run ATen's own kernels (im2col + MKL gemm, reproducible under MKL_CBWR). oneDNN chooses its
    blocking by the CPU's cache sizes and promises equal results only on the same CPU type: under the pin alone an
    AVX-512 Sapphire Rapids machine still gave other numbers than the machine the committed results come from.
    NNPACK off too: with oneDNN off, torch sends a convolution over 16 or more images to NNPACK, whose sums are blocked
    by the CPU's L1 cache size (so another CPU adds in another order) and whose result differs from the same images
    one by one (2e-5 on EfficientNet-Lite0 features); without it every convolution runs im2col + MKL gemm, the same
    kernel at every batch size (benchmarks/bench_convs.py, docs/performance.md "Convolutions under the CPU pin")."""
    if (os.environ.get(ENV) or DEFAULT) == "native" or not _x86():
        return
    import torch

    torch.backends.mkldnn.enabled = False
    torch.backends.nnpack.set_flags(False)


def record() -> dict[str, Any]:
    """What run.json records: the level, the variables in effect, and the capability torch actually uses."""
    names = sorted({n for v in LEVELS.values() for n in v})
    out: dict[str, Any] = {"level": os.environ.get(ENV, "unpinned"), "env": {n: os.environ.get(n) for n in names}}
    try:
        import torch  # by now pinned: the caller runs the pipeline, which imports torch anyway
    except ImportError:
        return out
    out["torch_capability"] = torch.backends.cpu.get_cpu_capability()
    out["torch_onednn"] = bool(torch.backends.mkldnn.enabled)
    out["torch_nnpack"] = bool(torch._C._get_nnpack_enabled())
    return out

"""Programmatic dependent launch (PDL) for the decode step's kernels, opt-in.

On Hopper a kernel launched with ``launch_pdl=True`` may start while the kernel before it on the
stream is still finishing: every program of the earlier kernel runs ``griddepcontrol
.launch_dependents`` as it starts, and every program of the later one runs ``griddepcontrol.wait``
(which returns once the earlier kernel has completed and its writes are visible) before it reads
anything. That hides the launch gap between the step's back-to-back µs-scale kernels (scoring +
top-k → split attention → merge), in eager mode and inside CUDA graphs (captured as programmatic
edges). Each kernel waits first thing, before any load and before any early exit, so the order of
memory effects is the same as without PDL (a kernel that exits without waiting could complete
before its predecessor and release its successor too early).

Off by default; ``M3SERVE_PDL=1`` or ``use_pdl(True)`` turns it on (sm_90+ only; never under the
Triton interpreter, which has no inline PTX). The benchmark times the step both ways.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

try:  # Triton ≥ 3.3 (the GPU machine's 3.6 has it)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton: PDL stays off
    gdc_launch_dependents = gdc_wait = None

_STATE = {"on": os.environ.get("M3SERVE_PDL", "0") == "1"}


def use_pdl(on: bool) -> None:
    """Turn PDL on or off for the decode kernels launched from now on."""
    _STATE["on"] = bool(on)


@contextlib.contextmanager
def pdl(on: bool) -> Iterator[None]:
    """Scope PDL on or off (benchmarks time the step both ways in one process)."""
    before = _STATE["on"]
    use_pdl(on)
    try:
        yield
    finally:
        use_pdl(before)


def pdl_active(t: torch.Tensor) -> bool:
    """Whether kernels on ``t``'s device launch with PDL now."""
    if not _STATE["on"] or gdc_wait is None or not t.is_cuda:
        return False
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    return torch.cuda.get_device_capability(t.device)[0] >= 9


def launch_kwargs(on: bool, maxnreg: int | None = None) -> dict:
    """Extra launch options for ``kernel[grid](...)``: PDL, and an optional register cap per
    thread (Triton's maxnreg; ignored under the interpreter, which has no registers to cap)."""
    opts: dict = {"launch_pdl": True} if on else {}
    if maxnreg and os.environ.get("TRITON_INTERPRET", "0") != "1":
        opts["maxnreg"] = int(maxnreg)
    return opts


@triton.jit
def pdl_prologue(PDL: tl.constexpr):
    """First statement of a PDL kernel: let the next kernel launch, then wait for the previous."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()

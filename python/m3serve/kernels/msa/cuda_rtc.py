"""Compile CUDA C++ with NVRTC and launch it through the driver API: no nvcc, no host compiler.

torch's CUDA wheels ship libnvrtc (nvidia/cu13/lib or nvidia/cuda_nvrtc/lib), and the GPU test
machine has no build tools we may rely on, so kernels written in CUDA (sparse_prefill_main.cu)
are compiled at first use into a cubin for the device's architecture (sm_90a on Hopper, the
"a" for wgmma), loaded with cuModuleLoadData and launched with cuLaunchKernel on torch's
current stream (so they are captured by CUDA graphs like any other launch).

    k = get_kernel(src, "msa_prefill_main<16, 64>", "sm_90a", max_smem)   # cached per process
    k.launch(grid, 128, smem, [tensor, 3, 1.5, ...], "pif...")

compile_cubin() needs no GPU: tests compile the kernel on a CPU-only machine and read ptxas's
resource report (registers, spills) from the log.
"""

from __future__ import annotations

import ctypes
import glob
import os
from dataclasses import dataclass
from functools import cache, lru_cache

import torch


class CudaRtcError(RuntimeError):
    """NVRTC or driver failure, with the compiler log or the driver's error name."""


@lru_cache(maxsize=1)
def _nvrtc() -> ctypes.CDLL:
    site = os.path.dirname(os.path.dirname(torch.__file__))
    pats = [
        f"{site}/nvidia/cu13/lib/libnvrtc.so*",
        f"{site}/nvidia/cuda_nvrtc/lib/libnvrtc.so*",
        f"{os.path.dirname(torch.__file__)}/lib/libnvrtc*.so*",
    ]
    cands = [p for pat in pats for p in sorted(glob.glob(pat)) if "builtins" not in p]
    cands += ["libnvrtc.so"]
    errs = []
    for c in cands:
        try:
            return ctypes.CDLL(c)
        except OSError as e:
            errs.append(f"{c}: {e}")
    raise CudaRtcError("libnvrtc not found; tried " + "; ".join(errs))


@lru_cache(maxsize=1)
def _cuda() -> ctypes.CDLL:
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        raise CudaRtcError(f"the CUDA driver (libcuda.so.1) is not loadable: {e}") from e


def _check_nvrtc(rc: int, what: str) -> None:
    if rc != 0:
        _nvrtc().nvrtcGetErrorString.restype = ctypes.c_char_p
        msg = _nvrtc().nvrtcGetErrorString(rc)
        raise CudaRtcError(f"{what}: NVRTC error {rc} ({msg.decode() if msg else '?'})")


def _check_cu(rc: int, what: str) -> None:
    if rc != 0:
        name = ctypes.c_char_p()
        _cuda().cuGetErrorName(rc, ctypes.byref(name))
        raise CudaRtcError(f"{what}: CUDA driver error {rc} ({(name.value or b'?').decode()})")


@dataclass
class Cubin:
    image: bytes
    lowered_name: str
    log: str  # NVRTC + ptxas messages (with -Xptxas -v: registers, shared memory, spills)


def compile_cubin(src: str, name: str, arch: str, options: tuple[str, ...] = ()) -> Cubin:
    """NVRTC: source → cubin for ``arch`` (e.g. "sm_90a"); ``name`` may be a template-id."""
    lib = _nvrtc()
    prog = ctypes.c_void_p()
    _check_nvrtc(
        lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"kernel.cu", 0, None, None),
        "nvrtcCreateProgram",
    )
    try:
        _check_nvrtc(lib.nvrtcAddNameExpression(prog, name.encode()), "nvrtcAddNameExpression")
        opts = [f"--gpu-architecture={arch}", "--std=c++17", "-default-device", *options]
        arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, buf)
        log = buf.value.decode(errors="replace")
        if rc != 0:
            raise CudaRtcError(f"compiling {name} for {arch} failed:\n{log}")
        _check_nvrtc(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
        image = ctypes.create_string_buffer(size.value)
        _check_nvrtc(lib.nvrtcGetCUBIN(prog, image), "nvrtcGetCUBIN")
        lowered = ctypes.c_char_p()
        _check_nvrtc(
            lib.nvrtcGetLoweredName(prog, name.encode(), ctypes.byref(lowered)),
            "nvrtcGetLoweredName",
        )
        return Cubin(image.raw, (lowered.value or b"").decode(), log)
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


_ARG_TYPES = {"p": ctypes.c_void_p, "i": ctypes.c_int32, "l": ctypes.c_int64, "f": ctypes.c_float}


class Kernel:
    """A loaded kernel; launch() takes tensors / ints / floats typed by a format string."""

    def __init__(self, cubin: Cubin, max_smem: int) -> None:
        cu = _cuda()
        torch.cuda.init()
        torch.cuda.current_stream()  # the primary context is current on this thread
        self.module = ctypes.c_void_p()
        _check_cu(cu.cuModuleLoadData(ctypes.byref(self.module), cubin.image), "cuModuleLoadData")
        self.func = ctypes.c_void_p()
        _check_cu(
            cu.cuModuleGetFunction(
                ctypes.byref(self.func), self.module, cubin.lowered_name.encode()
            ),
            "cuModuleGetFunction",
        )
        # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
        _check_cu(cu.cuFuncSetAttribute(self.func, 8, int(max_smem)), "cuFuncSetAttribute")
        self.max_smem = max_smem

    def launch(self, grid: int, block: int, smem: int, args: list, types: str) -> None:
        assert len(args) == len(types), f"{len(args)} args for types {types!r}"
        assert smem <= self.max_smem, f"smem {smem} > configured {self.max_smem}"
        vals = []
        for a, t in zip(args, types, strict=True):
            v = a.data_ptr() if isinstance(a, torch.Tensor) else a
            vals.append(_ARG_TYPES[t](v))
        ptrs = (ctypes.c_void_p * len(vals))(*[ctypes.addressof(v) for v in vals])
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        _check_cu(
            _cuda().cuLaunchKernel(self.func, grid, 1, 1, block, 1, 1, smem, stream, ptrs, None),
            "cuLaunchKernel",
        )


_KERNELS: dict[tuple, Kernel] = {}


def get_kernel(src: str, name: str, arch: str, max_smem: int,
               options: tuple[str, ...] = ()) -> Kernel:  # fmt: skip
    """Compile once per (source, name, arch, options) and device; cached for the process."""
    key = (hash(src), name, arch, options, torch.cuda.current_device())
    k = _KERNELS.get(key)
    if k is None:
        k = _KERNELS[key] = Kernel(compile_cubin(src, name, arch, options), max_smem)
    return k


def device_arch(device: int | None = None) -> str:
    """ "sm_90a" on Hopper (wgmma needs the arch-specific target), else "sm_XY" (of ``device``,
    default the current one)."""
    return _arch(torch.cuda.current_device() if device is None else device)


@cache
def _arch(device: int) -> str:  # one driver query per device: launches call this every time
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}" + ("a" if major == 9 else "")

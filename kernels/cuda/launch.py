"""Launching an NVRTC-compiled kernel with little host work per call.

torch's `_CudaKernel.__call__` (torch.cuda._utils) opens libcuda with ctypes.CDLL and builds a fresh ctypes
argument array on every call. In eager decode that Python costs more than a 7B-shaped matrix takes to stream
on the GPU, so the host, not the kernel, sets the pace. A PreparedLaunch fills its argument block once (the
weight's buffer pointers and the sizes) and per call writes only the pointers that change, the input and the
output, before one cuLaunchKernel through a function pointer whose argument types are declared once.

fit_shared_memory_carveout sets, once per loaded kernel, how much of each SM is shared memory and how much L1.
"""
from __future__ import annotations

import ctypes
import functools
import threading

import torch

__all__ = ["PreparedLaunch", "carveout_percent", "current_raw_stream", "fit_shared_memory_carveout"]

# CUDA driver enums (cuda.h) this file passes by number, as ctypes has no header.
_FUNC_SHARED_SIZE_BYTES, _FUNC_PREFERRED_SHARED_MEMORY_CARVEOUT = 1, 9
_DEVICE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR, _DEVICE_RESERVED_SHARED_MEMORY_PER_BLOCK = 81, 111


@functools.lru_cache(maxsize=None)
def _driver() -> tuple[ctypes.CDLL, ctypes._CFuncPtr]:
    """libcuda (or HIP's renamed entry points, as torch maps them) and its cuLaunchKernel, typed once."""
    from torch.cuda._utils import _get_gpu_runtime_library

    library = _get_gpu_runtime_library()  # a CDLL of its own: these argtypes touch no other caller's
    launch = library.cuLaunchKernel
    launch.argtypes = [ctypes.c_void_p, *[ctypes.c_uint] * 7, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    launch.restype = ctypes.c_int
    return library, launch


def current_raw_stream(device: torch.device) -> int:
    """The current CUDA stream of `device` as the driver's handle (inside a graph capture: the capturing one)."""
    return torch._C._cuda_getCurrentRawStream(device.index if device.index is not None else torch.cuda.current_device())


def carveout_percent(ctas_per_sm: int, shared_per_cta: int, reserved_per_cta: int, shared_per_sm: int) -> int:
    """The smallest shared-memory carve-out, in percent of `shared_per_sm`, that still holds `ctas_per_sm` CTAs
    of `shared_per_cta` bytes each (plus what the driver reserves per CTA); the rest of the SM's 256 KiB is L1."""
    needed = ctas_per_sm * (shared_per_cta + reserved_per_cta)
    return max(0, min(100, -(-100 * needed // shared_per_sm)))


def fit_shared_memory_carveout(function: ctypes.c_void_p | int, threads_per_cta: int, device_index: int) -> int:
    """Asks the driver to split `function`'s SMs between shared memory and L1 so that shared memory holds just the
    CTAs that its registers and threads let an SM run at once, and returns the percent asked for.

    Why: without a preference the driver sized shared memory at 135 KB of the 256 KB for the row kernel, which
    needs 26 KB or less per SM, leaving L1 about 120 KB for the x fragments that every block-row on an SM reads
    again. Fitted, the row kernel ran 0.4% slower to 5.6% faster in 120 cases timed side by side on an H100 (median
    +0.1%; the gains at 8-16 tokens on 4096-5120-row matrices; session 25, docs/kernels.md), with the CTAs per SM
    unchanged (tests/kernels/test_mma_decode.py checks them with the occupancy API).
    """
    library, _ = _driver()
    handle = ctypes.c_void_p(function.value if isinstance(function, ctypes.c_void_p) else int(function))
    shared, per_sm, reserved, ctas = ctypes.c_int(), ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    _raise_on(library.cuFuncGetAttribute(ctypes.byref(shared), _FUNC_SHARED_SIZE_BYTES, handle))
    _raise_on(library.cuDeviceGetAttribute(ctypes.byref(per_sm), _DEVICE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR,
                                           device_index))
    _raise_on(library.cuDeviceGetAttribute(ctypes.byref(reserved), _DEVICE_RESERVED_SHARED_MEMORY_PER_BLOCK,
                                           device_index))
    # Asked before the preference is set, so the count is what the registers and threads allow.
    _raise_on(library.cuOccupancyMaxActiveBlocksPerMultiprocessor(ctypes.byref(ctas), handle, threads_per_cta,
                                                                  ctypes.c_size_t(0)))
    percent = carveout_percent(ctas.value, shared.value, reserved.value, per_sm.value)
    _raise_on(library.cuFuncSetAttribute(handle, _FUNC_PREFERRED_SHARED_MEMORY_CARVEOUT, percent))
    return percent


def _raise_on(error: int) -> None:
    if error:
        from torch.cuda._utils import _check_cuda  # turns the code into the driver's message

        _check_cuda(error)


class PreparedLaunch:
    """One kernel at one grid with its arguments set: tensors as their data pointers, Python ints as C ints.

    Calling it with `pointers` overwrites the first len(pointers) pointer arguments, then launches on `stream`
    (a raw handle, current_raw_stream). A lock keeps two threads from mixing their pointers; the driver copies
    the arguments at launch, so the block can be rewritten right after.
    """

    def __init__(self, function: ctypes.c_void_p | int, grid: tuple[int, int, int], block: tuple[int, int, int],
                 args: list[torch.Tensor | int], shared_mem: int = 0) -> None:
        self._function = function.value if isinstance(function, ctypes.c_void_p) else int(function)
        self._dims = (*grid, *block, shared_mem)
        self._slots: list[ctypes.c_void_p | ctypes.c_int] = []
        for arg in args:
            if isinstance(arg, torch.Tensor):
                self._slots.append(ctypes.c_void_p(arg.data_ptr()))
            elif isinstance(arg, int):
                self._slots.append(ctypes.c_int(arg))
            else:
                raise TypeError(f"kernel arguments are tensors or ints, got {type(arg).__name__}")
        self._params = (ctypes.c_void_p * len(self._slots))(*(ctypes.addressof(s) for s in self._slots))
        self._lock = threading.Lock()

    def __call__(self, *pointers: int, stream: int) -> None:
        with self._lock:
            for slot, pointer in zip(self._slots, pointers):
                slot.value = pointer
            error = _driver()[1](self._function, *self._dims, stream, self._params, None)
        _raise_on(error)

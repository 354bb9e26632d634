"""Launching an NVRTC-compiled kernel with little host work per call.

torch's `_CudaKernel.__call__` (torch.cuda._utils) opens libcuda with ctypes.CDLL and builds a fresh ctypes
argument array on every call. In eager decode that Python costs more than a 7B-shaped matrix takes to stream
on the GPU, so the host, not the kernel, sets the pace. A PreparedLaunch fills its argument block once (the
weight's buffer pointers and the sizes) and per call writes only the pointers that change, the input and the
output, before one cuLaunchKernel through a function pointer whose argument types are declared once.
"""
from __future__ import annotations

import ctypes
import functools
import threading

import torch

__all__ = ["PreparedLaunch", "current_raw_stream"]


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
        if error:
            from torch.cuda._utils import _check_cuda  # turns the code into the driver's message

            _check_cuda(error)

"""The prepared kernel launch (tierprune/kernels/cuda/launch.py): its argument block, which needs no GPU."""
from __future__ import annotations

import ctypes

import pytest
import torch

from tierprune.kernels.cuda.launch import PreparedLaunch

pytestmark = pytest.mark.unit


def test_the_argument_block_points_at_each_value_and_takes_new_pointers() -> None:
    x, out, weight = torch.zeros(4), torch.zeros(8), torch.zeros(16)
    launch = PreparedLaunch(0, (3, 1, 1), (64, 1, 1), [x, out, weight, 5, -7])
    assert [launch.argument(i) for i in range(5)] == [x.data_ptr(), out.data_ptr(), weight.data_ptr(), 5, -7]
    # the driver reads argument i at the address in slot i of the block: a void* for tensors, an int for ints
    params = launch._params
    assert ctypes.c_void_p.from_address(params[2]).value == weight.data_ptr()
    assert ctypes.c_int.from_address(params[4]).value == -7
    other_x, other_out = torch.zeros(4), torch.zeros(8)
    for slot, tensor in zip(launch._slots[:2], (other_x, other_out)):  # what __call__ does before launching
        slot.value = tensor.data_ptr()
    assert ctypes.c_void_p.from_address(params[0]).value == other_x.data_ptr()
    assert ctypes.c_void_p.from_address(params[1]).value == other_out.data_ptr()
    assert launch.argument(2) == weight.data_ptr()  # the weight's pointer stays


def test_only_tensors_and_ints_are_arguments() -> None:
    with pytest.raises(TypeError, match="float"):
        PreparedLaunch(0, (1, 1, 1), (32, 1, 1), [torch.zeros(1), 0.5])

"""The prepared kernel launch (tierprune/kernels/cuda/launch.py): its argument block, which needs no GPU."""
from __future__ import annotations

import ctypes

import pytest
import torch

from tierprune.kernels.cuda.launch import PreparedLaunch, carveout_percent

pytestmark = pytest.mark.unit


def test_the_argument_block_points_at_each_value_and_takes_new_pointers() -> None:
    x, out, weight = torch.zeros(4), torch.zeros(8), torch.zeros(16)
    launch = PreparedLaunch(0, (3, 1, 1), (64, 1, 1), [x, out, weight, 5, -7])

    def arguments() -> list[int]:  # what the driver reads: a void* at slot i's address for tensors, an int for ints
        params = launch._params
        return [ctypes.c_void_p.from_address(params[i]).value for i in range(3)] + \
            [ctypes.c_int.from_address(params[i]).value for i in (3, 4)]

    assert arguments() == [x.data_ptr(), out.data_ptr(), weight.data_ptr(), 5, -7]
    other_x, other_out = torch.zeros(4), torch.zeros(8)
    for slot, tensor in zip(launch._slots, (other_x, other_out)):  # what __call__ does before launching
        slot.value = tensor.data_ptr()
    assert arguments() == [other_x.data_ptr(), other_out.data_ptr(), weight.data_ptr(), 5, -7]  # the rest stays


def test_only_tensors_and_ints_are_arguments() -> None:
    with pytest.raises(TypeError, match="float"):
        PreparedLaunch(0, (1, 1, 1), (32, 1, 1), [torch.zeros(1), 0.5])


def test_the_carveout_holds_the_resident_ctas_and_no_more() -> None:
    per_sm, reserved = 228 * 1024, 1024  # an H100's shared memory per SM and what the driver keeps per CTA
    percent = carveout_percent(2, 25216, reserved, per_sm)  # the 16-warp row kernel at 9-16 tokens
    assert percent == 23
    assert percent * per_sm / 100 >= 2 * (25216 + reserved) > (percent - 1) * per_sm / 100
    assert carveout_percent(0, 25216, reserved, per_sm) == 0  # no shared memory: all L1
    assert carveout_percent(32, 48 * 1024, reserved, per_sm) == 100  # more than fits: the most the driver has

"""Kernel tests run on the CPU and, where there is one, on CUDA.

Without CUDA the Triton kernels run in Triton's interpreter (numpy on the CPU). Triton 3.x reads
TRITON_INTERPRET when `@triton.jit` decorates a kernel, so it is set here, before any test module
imports a kernel module.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(params=[
    "cpu",
    pytest.param("cuda", marks=(pytest.mark.gpu,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))),
])
def device(request: pytest.FixtureRequest) -> str:
    return request.param

"""Kernel tests run on the CPU and, where there is one, on CUDA."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(params=[
    "cpu",
    pytest.param("cuda", marks=(pytest.mark.gpu,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))),
])
def device(request: pytest.FixtureRequest) -> str:
    return request.param

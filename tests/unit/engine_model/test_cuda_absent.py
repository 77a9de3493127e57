"""Without CUDA the device-copy backend refuses to start with a message that says why and what to use."""

from __future__ import annotations

import pytest
import torch

from dualpath_engine.transfer import cuda

pytestmark = [
    pytest.mark.timeout(30),
    pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour; CUDA is present"),
]


def test_cuda_backend_without_cuda_fails_with_a_clear_reason() -> None:
    with pytest.raises(cuda.CudaUnavailableError, match=r"CUDA is not available.*use device 'cpu'"):
        cuda.PinnedArena(1 << 20, 1 << 16)
    with pytest.raises(cuda.CudaUnavailableError):
        cuda.require_cuda()

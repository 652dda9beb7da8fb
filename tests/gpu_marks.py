"""The skip marker of the GPU kernel tests (shared by the test modules): they run where CUDA and the Triton
kernels are available (sm80+) and skip everywhere else, CI included."""

import pytest
import torch


def gpu_kernels_available() -> bool:
    if not torch.cuda.is_available():
        return False
    from duquant.kernels import gpu_available

    return gpu_available()[0]


needs_gpu = pytest.mark.skipif(not gpu_kernels_available(), reason="needs CUDA + triton, sm80+")

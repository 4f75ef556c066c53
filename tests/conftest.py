"""Suite-wide settings.

Tiny models spend their time in thread start-up, not arithmetic: one OpenMP thread per process is as fast when the
machine is idle and far faster when it is shared (two-process torchrun tests would otherwise run four threads on two
cores). Set before torch is imported, so subprocesses inherit it; an explicit OMP_NUM_THREADS wins.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402 - after the thread setting above
import torch  # noqa: E402

#: every device a lifecycle / trainer / save-load / export test runs on; `pytest -m gpu` selects the CUDA ones
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")]),
]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param

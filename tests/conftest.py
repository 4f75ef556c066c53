"""Suite-wide settings.

Tiny models spend their time in thread start-up, not arithmetic: one OpenMP thread per process is as fast when the
machine is idle and far faster when it is shared (two-process torchrun tests would otherwise run four threads on two
cores). Set before torch is imported, so subprocesses inherit it; an explicit OMP_NUM_THREADS wins.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

"""Suite-wide settings. Tiny models are dominated by per-op overhead: one intra-op thread is
several times faster than two on a 2-core CI machine, and avoids oversubscription when CLI tests
spawn subprocesses (which inherit OMP_NUM_THREADS)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    import torch

    torch.set_num_threads(1)

"""Kernel tests run on the CPU under Triton's interpreter unless a CUDA device is present. The
variable must be set before Triton compiles a kernel (at the kernel module's import)."""
from __future__ import annotations

import os


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if not _cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")

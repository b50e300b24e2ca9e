"""Shared pytest setup.

Triton reads ``TRITON_INTERPRET`` when a kernel is decorated, so it must be set before
any test module imports ``medseek.kernels``. On a machine without an NVIDIA GPU the
Triton kernels can only run in the interpreter, which is how CI tests them.
"""

import os
from pathlib import Path

if not Path("/dev/nvidia0").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

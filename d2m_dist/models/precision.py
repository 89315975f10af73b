"""Mixed precision: where bf16 autocast applies, and the regions that must stay fp32.

Training on GPU runs the student under DeepSpeed's ``torch_autocast`` (fp32
master weights, bf16 matrix products) and the teacher under the same autocast.
Routers decide discrete assignments from small logit differences, so they run
in fp32 even inside an autocast region (docs/METHOD.md, section 1: fp32 routers).
"""

from __future__ import annotations

import contextlib

import torch


def fp32_region(device_type: str):
    """Autocast switched off: the tensors' own (fp32) dtype is used inside."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def bf16_autocast(device_type: str, enabled: bool):
    """bf16 autocast on ``device_type`` when ``enabled``; nothing otherwise."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)

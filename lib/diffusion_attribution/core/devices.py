"""Helpers for the torch device a computation runs on."""

from __future__ import annotations

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the kernels queued on ``device`` (so that wall-clock timings on an accelerator
    are true); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)

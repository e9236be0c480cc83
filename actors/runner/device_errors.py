"""Whether an error left this process's GPU unusable."""

from __future__ import annotations

import torch


def device_lost(error: BaseException, device: torch.device) -> bool:
    """True if `error` came from CUDA and `device` now fails every call.

    A sticky CUDA error (an illegal address, a device-side assert, a hardware fault) poisons the
    process's CUDA context: every later launch and sync fails too, and only a new process can use
    the GPU again. Other CUDA failures (out of memory, a bad argument) leave the device usable.
    """
    if device.type != "cuda" or "CUDA error" not in str(error):
        return False
    try:
        torch.cuda.synchronize(device)
    except Exception:  # the context is poisoned: the same error again
        return True
    return False

"""Host values to the device without waiting for it.

`torch.tensor(values, device="cuda")` copies from pageable memory with a blocking copy, and
a blocking copy waits for everything queued on the stream: one in a decode step's launch
and the step after it can no longer be queued while this one runs. `to_device` goes
through pinned memory instead, queued on the current stream.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def to_device(values: Sequence[int] | Sequence[float] | Sequence[bool] | np.ndarray, dtype: torch.dtype,
              device: torch.device) -> torch.Tensor:
    """`values` as a `dtype` tensor on `device`; on a GPU, copied through pinned memory on the current
    stream without a host wait (the pinned buffer is kept until the copy has run)."""
    host = torch.as_tensor(np.ascontiguousarray(values) if isinstance(values, np.ndarray) else values, dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host

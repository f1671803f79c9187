"""What the kernels' launch heuristics ask about the device, asked once per device (the host side of every
launch runs it, and ``torch.cuda.get_device_properties`` costs ~10 us of Python each time)."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device) -> int:
    """Streaming multiprocessors of a CUDA device; 132 (an H100's) elsewhere (the interpreter on a CPU)."""
    d = torch.device(device)
    if d.type != "cuda":
        return 132
    return _sm_count(d.index if d.index is not None else torch.cuda.current_device())

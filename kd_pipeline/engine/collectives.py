"""The loop's small host-side collectives (metrics, stop flags, waiting for rank 0), in one place.

NCCL only moves CUDA tensors and gloo only CPU ones, so where a scalar tensor must live before a collective is
decided here and nowhere else. Values travel as fp64: token counts and sums stay exact far beyond 2^24.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

SUM = dist.ReduceOp.SUM
MAX = dist.ReduceOp.MAX


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def collective_device() -> torch.device:
    """Where a tensor must be for a collective of the default process group."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_floats(values: Sequence[float], op=SUM) -> list[float]:
    """``values`` reduced element-wise over every rank with ``op`` (one all-reduce); unchanged in one process."""
    if not is_distributed():
        return [float(value) for value in values]
    packed = torch.tensor([float(value) for value in values], dtype=torch.float64, device=collective_device())
    dist.all_reduce(packed, op=op)
    return packed.tolist()

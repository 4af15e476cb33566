"""whiten(distributed=True) on two gloo ranks equals whitening the valid tokens of both ranks together."""

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as multiprocessing

from kd_pipeline.losses.minillm import whiten

# Each rank holds a different batch with different padding; rank 1 is shifted so the global mean differs from both.
RANK_VALUES = [
    torch.arange(8, dtype=torch.float64).reshape(2, 4),
    10.0 + torch.arange(6, dtype=torch.float64).reshape(2, 3),
]
RANK_MASKS = [torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]])]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run_rank(rank: int, port: int, result_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.save(whiten(RANK_VALUES[rank], RANK_MASKS[rank], distributed=True), f"{result_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_whitening_uses_the_statistics_of_all_ranks(tmp_path):
    multiprocessing.spawn(_run_rank, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    all_valid = torch.cat([values[mask.bool()] for values, mask in zip(RANK_VALUES, RANK_MASKS)])
    mean, variance = all_valid.mean(), all_valid.var(unbiased=False)
    for rank in (0, 1):
        whitened = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        valid = RANK_MASKS[rank].bool()
        expected = (RANK_VALUES[rank][valid] - mean) / torch.sqrt(variance + 1e-8)
        torch.testing.assert_close(whitened[valid], expected)
        assert torch.all(whitened[~valid] == 0)
        # Local statistics would give a different answer: the test sees whether the all-reduce happened.
        assert not torch.allclose(whitened, whiten(RANK_VALUES[rank], RANK_MASKS[rank]))

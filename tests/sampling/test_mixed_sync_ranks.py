"""sync_ranks=True: two gloo ranks whose rows finish at different times run the same number of decode steps."""

import json
import socket
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as multiprocessing

from kd_pipeline.sampling import sample_mixed

VOCAB = 4
EOS = 3
PAD = 0
MAX_NEW_TOKENS = 12
CHECK_EVERY = 4


class FixedNextToken(torch.nn.Module):
    """Same next-token logits whatever the input; counts its forwards."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits  # (V,)
        self.forwards = 0

    def forward(self, input_ids, use_cache=None, **unused_inputs):
        self.forwards += 1
        batch_logits = self.logits.expand(input_ids.shape[0], 1, -1)  # (B, 1, V)
        return SimpleNamespace(logits=batch_logits, cache=SimpleNamespace() if use_cache else None)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run_rank(rank: int, port: int, result_dir: str) -> None:
    """One rank: a synchronised rollout, then an unsynchronised one; writes what each did."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        # Rank 0 always emits EOS at once; rank 1 never emits it.
        logits = torch.full((VOCAB,), -50.0)
        if rank == 0:
            logits[EOS] = 50.0
        else:
            logits[1] = 0.0
        prompts = torch.tensor([[1], [2]])
        for sync_ranks in (True, False):
            student, teacher = FixedNextToken(logits), FixedNextToken(logits)
            rollout = sample_mixed(student, teacher, prompts, torch.ones_like(prompts),
                                   max_new_tokens=MAX_NEW_TOKENS, eos_token_id=EOS, pad_token_id=PAD,
                                   check_every=CHECK_EVERY, sync_ranks=sync_ranks,
                                   generator=torch.Generator().manual_seed(rank))
            summary = {"steps": rollout.tokens.shape[1], "forwards": student.forwards,
                       "lengths": rollout.lengths.tolist()}
            with open(f"{result_dir}/rank{rank}_{sync_ranks}.json", "w") as handle:
                json.dump(summary, handle)
    finally:
        dist.destroy_process_group()


def test_synchronised_ranks_decode_the_same_number_of_steps(tmp_path):
    multiprocessing.spawn(_run_rank, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    synced = [json.loads((tmp_path / f"rank{rank}_True.json").read_text()) for rank in (0, 1)]
    assert [summary["steps"] for summary in synced] == [MAX_NEW_TOKENS, MAX_NEW_TOKENS]
    assert [summary["forwards"] for summary in synced] == [MAX_NEW_TOKENS, MAX_NEW_TOKENS]
    assert synced[0]["lengths"] == [1, 1] and synced[1]["lengths"] == [MAX_NEW_TOKENS, MAX_NEW_TOKENS]
    # Without the collective check the finished rank stops at its first check: the two would fall out of step.
    unsynced = [json.loads((tmp_path / f"rank{rank}_False.json").read_text()) for rank in (0, 1)]
    assert [summary["steps"] for summary in unsynced] == [CHECK_EVERY, MAX_NEW_TOKENS]

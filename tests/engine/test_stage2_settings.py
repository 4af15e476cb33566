"""Stage 2 at MiniLLM's ratios: what the config accepts and refuses, and the round statistics over ranks."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as multiprocessing

from kd_pipeline.config import ConfigError, load_config
from kd_pipeline.recipes.minillm import round_statistics

STAGE2 = ["run.stage=minillm", "run.init_from=runs/stage1"]


def test_minillm_ratios_are_expressible_on_two_ranks():
    """>= 64 sequences per optimizer step on 2 ranks, 4 PPO epochs, a tenth of SFT's lr with warm-up."""
    config = load_config(None, [*STAGE2, "train.micro_batch_size=8", "train.grad_accum=4", "train.lr=2e-5",
                                "train.warmup_steps=5", "minillm.rollouts_per_rank=32", "minillm.ppo_epochs=4"])
    assert config.train.micro_batch_size * config.train.grad_accum * 2 == 64
    assert config.minillm.ppo_epochs == 4 and config.train.warmup_steps == 5


def test_a_step_may_span_rounds():
    """One rank, 64 sequences per step from rounds of 8 rollouts: 2 micro-batches x 4 epochs = 8 per round, a step
    of 16 micro-batches spans two rounds (refused before steps could cross a round's end)."""
    config = load_config(None, [*STAGE2, "train.micro_batch_size=4", "train.grad_accum=16",
                                "minillm.rollouts_per_rank=8", "minillm.ppo_epochs=4"])
    assert config.train.micro_batch_size * config.train.grad_accum == 64


@pytest.mark.parametrize("rollouts", [6, 2])
def test_rollouts_must_fill_whole_micro_batches(rollouts):
    with pytest.raises(ConfigError, match="minillm.rollouts_per_rank.*train.micro_batch_size=4"):
        load_config(None, [*STAGE2, "train.micro_batch_size=4", f"minillm.rollouts_per_rank={rollouts}"])


def test_lora_dropout_is_refused_in_stage2_only():
    with pytest.raises(ConfigError, match=r"student\.lora_dropout=0\.05 .*set student\.lora_dropout=0"):
        load_config(None, [*STAGE2, "student.lora=true", "student.lora_dropout=0.05"])
    assert load_config(None, [*STAGE2, "student.lora=true", "student.lora_dropout=0"]).student.lora_dropout == 0
    assert load_config(None, ["run.stage=kd_sft", "student.lora=true"]).student.lora_dropout == 0.05


# Rank 1 holds one outlier weight on a single token: a mean of per-rank means or maxima would hide or dilute it.
RANK_WEIGHTS = [torch.tensor([1.0, 0.5, 2.0, 0.5]), torch.tensor([9.0])]
RANK_REWARDS = [torch.tensor([0.1, -0.2, 0.3, 0.0]), torch.tensor([-1.0])]
RANK_LENGTHS = [torch.tensor([3.0, 1.0]), torch.tensor([1.0])]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank(rank: int, port: int, result_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        stats = round_statistics(RANK_REWARDS[rank], RANK_WEIGHTS[rank], RANK_LENGTHS[rank])
        torch.save(stats, f"{result_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_round_statistics_are_token_weighted_with_a_global_max(tmp_path):
    multiprocessing.spawn(_rank, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    weights, rewards, lengths = torch.cat(RANK_WEIGHTS), torch.cat(RANK_REWARDS), torch.cat(RANK_LENGTHS)
    expected = {"w_max": 9.0, "w_mean": float(weights.mean()), "reward": float(rewards.mean()),
                "len_mixed": float(lengths.mean())}
    for rank in (0, 1):
        stats = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert stats == pytest.approx(expected, abs=1e-6)
    assert expected["w_mean"] != pytest.approx((RANK_WEIGHTS[0].mean() + 9.0) / 2)  # not a mean of rank means


def test_round_statistics_single_process_match_the_plain_reductions():
    stats = round_statistics(RANK_REWARDS[0], RANK_WEIGHTS[0], RANK_LENGTHS[0])
    assert stats == pytest.approx({"w_max": 2.0, "w_mean": 1.0, "reward": 0.05, "len_mixed": 2.0})

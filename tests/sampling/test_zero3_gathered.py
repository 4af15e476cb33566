"""gathered_for_decoding on two CPU ranks under DeepSpeed ZeRO-3: parameters stay gathered across forwards, rollouts
equal the partitioned ones, and on exit the parameters are partitioned again with working hooks (training too)."""

import json
import os
import socket
from types import SimpleNamespace

import torch
import torch.multiprocessing as multiprocessing

VOCAB = 40
EOS = 2
PAD = 0


class TinyCausalLM(torch.nn.Module):
    """Embedding -> MLP -> vocab head over the last token, with the call interface sample_mixed uses. A plain
    module (not a transformers model) keeps each rank's start-up short; the ZeRO-3 hooks treat both alike."""

    def __init__(self, hidden: int):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, hidden)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(hidden, 2 * hidden), torch.nn.GELU(),
                                       torch.nn.Linear(2 * hidden, hidden))
        self.head = torch.nn.Linear(hidden, VOCAB)

    def forward(self, input_ids, labels=None, use_cache=None, **unused_inputs):
        logits = self.head(self.mlp(self.embed(input_ids)))  # (B, L, V)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return SimpleNamespace(logits=logits[:, -1:], loss=loss, cache=SimpleNamespace() if use_cache else None)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run_rank(rank: int, port: int, result_dir: str) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE="2")
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from kd_pipeline.sampling import sample_mixed
    from kd_pipeline.sampling.zero3 import gathered_for_decoding

    deepspeed.init_distributed(dist_backend="gloo")
    zero3 = {"stage": 3, "stage3_param_persistence_threshold": 0}
    student_config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": zero3,
                      "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    teacher_config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": zero3}

    with deepspeed.zero.Init(config_dict_or_path=teacher_config):
        torch.manual_seed(0)  # same seed on both ranks: same weights
        student_model, teacher_model = TinyCausalLM(32), TinyCausalLM(48)
    student = deepspeed.initialize(model=student_model, model_parameters=student_model.parameters(),
                                   config=student_config)[0]
    teacher = deepspeed.initialize(model=teacher_model, config=teacher_config)[0]
    probe = student_model.mlp[0].weight
    hooks_before = len(student.optimizer.parameter_offload.forward_hooks)
    prompts = torch.tensor([[PAD, 1, 5], [1, 6, 7]]) + rank
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])

    def rollout():
        student.eval()
        teacher.eval()
        return sample_mixed(student, teacher, prompts, prompt_mask, max_new_tokens=6, eos_token_id=EOS,
                            pad_token_id=PAD, generator=torch.Generator().manual_seed(3), sync_ranks=True)

    partitioned = rollout()
    with gathered_for_decoding(student, teacher):
        gathered = rollout()
        status_inside = probe.ds_status == ZeroParamStatus.AVAILABLE and probe.shape == (64, 32)
        hooks_inside = len(student.optimizer.parameter_offload.forward_hooks)
    status_after = probe.ds_status == ZeroParamStatus.NOT_AVAILABLE and probe.numel() == 0
    hooks_after = len(student.optimizer.parameter_offload.forward_hooks)
    partitioned_again = rollout()
    # A training step after the context: the re-registered hooks must gather for forward and backward.
    student.train()
    batch = torch.cat([prompts, partitioned.tokens], dim=1)
    loss = student(input_ids=batch, labels=batch).loss
    student.backward(loss)
    student.step()
    summary = {
        "same_tokens": torch.equal(partitioned.tokens, gathered.tokens)
        and torch.equal(partitioned.tokens, partitioned_again.tokens),
        "same_logprobs": torch.allclose(partitioned.student_logprob, gathered.student_logprob, atol=1e-6),
        "status_inside": status_inside, "status_after": status_after,
        "hooks": [hooks_before, hooks_inside, hooks_after], "loss_finite": bool(torch.isfinite(loss)),
    }
    with open(f"{result_dir}/rank{rank}.json", "w") as handle:
        json.dump(summary, handle)


def test_gathered_decoding_keeps_parameters_gathered_and_restores_zero3(tmp_path):
    multiprocessing.spawn(_run_rank, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        summary = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert summary["same_tokens"] and summary["same_logprobs"], summary
        assert summary["status_inside"] and summary["status_after"], summary
        hooks_before, hooks_inside, hooks_after = summary["hooks"]
        assert hooks_before > 0 and hooks_inside == 0 and hooks_after == hooks_before, summary
        assert summary["loss_finite"]

"""``kd_pipeline.plan``: its numbers against DeepSpeed's estimators called directly with counts taken from real
(CPU) models, the Korthikanti activation formula written out, the 13B-teacher / 7B-student plan at 8 GPUs, stage 2's
rollout peak against a hand computation, the verdict and the largest micro-batch, the shipped configs planned before
any checkpoint is converted, and the batch check the launch scripts run."""

import json
from pathlib import Path

import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs, model_to_params
from torch import nn

from kd_pipeline.losses import FeatureProjector

from kd_pipeline.config import load_config
from kd_pipeline.memory import GIB
from kd_pipeline.plan import main, make_plan

ROOT = Path(__file__).resolve().parents[1]
STAGE1, STAGE2 = ROOT / "configs" / "geochat_13b_to_7b.yaml", ROOT / "configs" / "geochat_13b_to_7b_stage2.yaml"


def run_plan(capsys, *argv) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def row(plan: dict, name: str) -> dict:
    (found,) = [r for r in plan["rows"] if r["name"] == name]
    return found


def real_student_and_teacher(overrides, tokenizer_dir):
    """The models training builds (on CPU, real tensors) and their counts, independently of plan.py."""
    from kd_pipeline.models import build_model
    from kd_pipeline.tokenizer import image_token_id, load_tokenizer

    config = load_config(None, overrides)
    tokenizer = load_tokenizer(tokenizer_dir)
    sizes = dict(vocab_size=len(tokenizer), image_token_id=image_token_id(tokenizer))
    student = build_model(config.student, **sizes)
    teacher = build_model(config.teacher, **sizes)
    parts = [student]
    if config.run.stage != "sft":  # StudentModule adds P only when there is a teacher
        parts.append(FeatureProjector(config.student.hidden_size, config.teacher.hidden_size))
    student_module = nn.ModuleList(parts)
    total, largest = model_to_params(student_module)  # DeepSpeed's own counting (data_ptr: real tensors)
    trainable = sum(p.numel() for p in student_module.parameters() if p.requires_grad)
    teacher_total, _ = model_to_params(teacher)
    return config, total, trainable, largest, teacher_total


@pytest.mark.parametrize("lora", [False, True])
def test_tiny_plan_equals_deepspeed_estimator(capsys, tokenizer_dir, lora):
    overrides = [f"data.tokenizer={tokenizer_dir}", f"student.lora={str(lora).lower()}", "student.lora_r=4",
                 "data.max_length=32", "student.attn_implementation=eager"]
    plan = run_plan(capsys, *overrides, "--world-size", "2")
    config, total, trainable, largest, teacher_total = real_student_and_teacher(overrides, tokenizer_dir)
    assert (plan["student"]["total"], plan["student"]["trainable"], plan["student"]["largest_layer"]) == \
        (total, trainable, largest)
    assert (trainable < total / 2) if lora else (trainable > total / 2)

    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(trainable, largest, num_gpus_per_node=2, num_nodes=1,
                                                        cpu_offload=False, cpu_offload_params=False, zero_init=True)
    states = row(plan, "student trainable states")
    assert (states["gpu"], states["cpu"]) == (gpu, cpu)
    all_cpu, all_gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, num_gpus_per_node=2, num_nodes=1,
                                                                cpu_offload=False, cpu_offload_params=False)
    assert plan["deepspeed_all_trainable"] == {"gpu": all_gpu, "cpu": all_cpu, "params": total}
    assert row(plan, "student frozen params")["gpu"] == 2 * (total - trainable) // 2
    assert row(plan, "teacher params (inference)")["gpu"] == 2 * teacher_total // 2
    assert row(plan, "teacher LM-head copy")["gpu"] == 2 * 401 * config.teacher.hidden_size

    # eager attention, no recomputation: L * s*b*h*(34 + 5*a*s/h) with s = 32 text + 16 image - 1.
    s, b, h, a, layers = 47, 2, 64, 4, 2
    assert row(plan, "student activations")["gpu"] == layers * (34 * s * b * h + 5 * a * s * s * b)
    assert plan["total"]["gpu"] == sum(r["gpu"] for r in plan["rows"])


def test_offload_config_reaches_the_estimator(capsys, tokenizer_dir):
    overrides = [f"data.tokenizer={tokenizer_dir}", "deepspeed.config=ds_configs/zero3_offload.json",
                 "deepspeed.offload_teacher_params=true", "run.stage=sft"]
    plan = run_plan(capsys, *overrides, "--world-size", "4", "--gpus-per-node", "2")
    _, total, trainable, largest, _ = real_student_and_teacher(overrides, tokenizer_dir)
    assert plan["student_zero"] == {"stage": 3, "offload_optimizer": True, "offload_param": True,
                                    "max_live_parameters": 10**9, "prefetch_bucket_size": int(0.9 * 64 * 64)}
    assert plan["teacher"] is None and plan["num_nodes"] == 2
    assert (plan["student"]["total"], plan["student"]["trainable"]) == (total, trainable)
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(trainable, largest, num_gpus_per_node=2, num_nodes=2,
                                                        cpu_offload=True, cpu_offload_params=True, zero_init=True)
    states = row(plan, "student trainable states")
    assert (states["gpu"], states["cpu"]) == (gpu, cpu)
    frozen = row(plan, "student frozen params")
    assert frozen["gpu"] == 0 and frozen["cpu"] == 2 * (total - trainable) // 2  # per node, 2 nodes


def test_geochat_13b_teacher_7b_student_on_8_gpus(capsys):
    overrides = ["student.arch=geochat-7b", "teacher.arch=geochat-13b", "student.image_size=504",
                 "teacher.image_size=504"]
    plan = run_plan(capsys, *overrides, "--world-size", "8")
    teacher = row(plan, "teacher params (inference)")
    assert teacher["params"] == plan["teacher"]["total"] and teacher["gpu"] == 2 * teacher["params"] // 8
    assert teacher["gpu"] == pytest.approx(13.0e9 * 2 / 8, rel=0.03)  # 13.35e9 with the CLIP tower
    assert plan["student"]["hidden_size"] == 4096 and plan["teacher"]["hidden_size"] == 5120

    # Full fine-tuning of the LLM and projector (+ P 4096x5120); the CLIP tower is frozen.
    student = plan["student"]
    assert 6.7e9 < student["trainable"] < 6.9e9 and 7.0e9 < student["total"] < 7.2e9
    assert student["largest_layer"] == 32001 * 4096  # the embedding / LM-head table
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(student["trainable"], student["largest_layer"],
                                                        num_gpus_per_node=8, num_nodes=1, cpu_offload=False,
                                                        cpu_offload_params=False)
    assert row(plan, "student trainable states")["gpu"] == gpu
    assert gpu == pytest.approx(18 * student["trainable"] / 8 + 4 * 32001 * 4096, rel=1e-6)

    # sdpa/flash attention (auto), no recomputation: 32 layers of 34*s*b*h, s = 2048 + 1296 - 1.
    assert row(plan, "student activations")["gpu"] == 32 * 34 * 3343 * 2 * 4096
    assert 20 * 2**30 < plan["total"]["gpu"] < 80 * 2**30

    assert main([*overrides, "--world-size", "8"]) == 0
    table = capsys.readouterr().out
    assert "ZeRO-3" in table and "8 rank(s)" in table and "teacher params (inference)" in table


def test_lora_and_checkpointing_shrink_the_7b_plan(capsys):
    base = ["student.arch=geochat-7b", "teacher.arch=geochat-13b", "student.image_size=504", "teacher.image_size=504"]
    full = run_plan(capsys, *base, "--world-size", "8")
    lean = run_plan(capsys, *base, "student.lora=true", "student.gradient_checkpointing=true", "--world-size", "8")
    assert lean["student"]["total"] > full["student"]["total"]  # adapters add parameters ...
    assert lean["student"]["trainable"] < full["student"]["trainable"] / 20  # ... but few train
    assert row(lean, "student trainable states")["gpu"] < row(full, "student trainable states")["gpu"] / 5
    s, b, h, layers = 3343, 2, 4096, 32
    assert row(lean, "student activations")["gpu"] == 2 * s * b * h * layers + 34 * s * b * h


def test_bad_input_is_one_line_exit_2(capsys, tmp_path):
    assert main(["--world-size", "3", "--gpus-per-node", "2"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: --world-size 3 is not a multiple of "
                                                           "--gpus-per-node 2"]
    stage0 = tmp_path / "zero0.json"
    stage0.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 0}}))
    assert main([f"deepspeed.config={stage0}", "run.stage=sft"]) == 2
    assert "ZeRO stage 0 has no DeepSpeed estimator" in capsys.readouterr().err
    assert main(["student.bogus=1"]) == 2
    assert "unknown key student.bogus" in capsys.readouterr().err


def test_stage2_rollout_peak_equals_a_hand_computation(capsys, monkeypatch):
    """The shipped stage-2 config, planned before conversion (the arch presets), 8 ranks: stated shape 7B LoRA
    student (32 layers x 4096) and 13B teacher (40 layers x 5120), 8 rollouts of 256 text + 1296 image - 1 prompt
    positions + 256 new tokens, both models gathered."""
    monkeypatch.chdir(ROOT)
    plan = run_plan(capsys, "--config", str(STAGE2), "--world-size", "8", "--gpu-memory-gib", "80")
    student, teacher = plan["student"]["total"], plan["teacher"]["total"]
    trainable, largest = plan["student"]["trainable"], plan["student"]["largest_layer"]
    assert 7.2e9 < student < 7.3e9 and 13.3e9 < teacher < 13.4e9 and 2.0e8 < trainable < 2.1e8

    _, states, _ = estimate_zero3_model_states_mem_needs(trainable, largest, num_gpus_per_node=8, num_nodes=1,
                                                         cpu_offload=False, cpu_offload_params=False, zero_init=True)
    held = (states + 2 * (student - trainable) // 8 + 2 * teacher // 8   # ZeRO-3 shards of both models
            + 2 * 32001 * 5120                                           # the teacher's LM-head copy
            + int(1.5 * GIB)                                             # stated CUDA/NCCL context
            + 2 * 8 * (256 + 1296) * 5120)                              # rollout buffer: hidden + features
    positions = 256 + 1296 - 1 + 256
    kv = 8 * positions * (2 * 32 * 4096 * 2 + 2 * 40 * 5120 * 2)          # (K, V) x layers x width x bf16, both
    gathered = 2 * (student + teacher)
    prefill = 2 * 8 * (256 + 1296 - 1) * (2 * 13824 + 5120)                # one 13B MLP over the prompts
    assert plan["phases"]["rollout"] == held + gathered + kv + prefill
    assert plan["phases"]["peak"] == plan["phases"]["rollout"] > plan["phases"]["step"]
    assert 60 * GIB < plan["phases"]["peak"] < 72 * GIB and plan["verdict"]["fits"] is True
    assert plan["notes"] == ["student.path=models/geochat-7b-hf has no config.json yet: counted as "
                             "student.arch=geochat-7b", "teacher.path=models/geochat-13b-hf has no config.json yet: "
                             "counted as teacher.arch=geochat-13b"]
    assert plan["batch"]["global"] == 64 == plan["batch"]["stated"]
    assert plan["largest_micro_batch"] == 8  # the largest divisor of rollouts_per_rank 8: decoding does not grow
    tight = run_plan(capsys, "--config", str(STAGE2), "--world-size", "8", "--gpu-memory-gib", "64")
    assert tight["verdict"]["fits"] is False and "does not fit" in tight["verdict"]["text"]


def test_readme_plan_command_gives_a_verdict_for_both_stages_before_conversion(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["--config", str(STAGE1.relative_to(ROOT)), "--config", str(STAGE2.relative_to(ROOT)),
                 "--world-size", "8", "--gpu-memory-gib", "80"]) == 0
    table = capsys.readouterr().out
    assert "memory plan, stage kd_sft" in table and "memory plan, stage minillm" in table
    assert table.count("verdict (--gpu-memory-gib): fits") == 2
    assert table.count("has no config.json yet: counted as student.arch=geochat-7b") == 2
    assert "largest train.micro_batch_size that fits" in table and "checkpoint:" in table


def test_a_path_without_config_and_no_preset_is_refused_naming_the_keys(capsys, tmp_path):
    assert main([f"student.path={tmp_path / 'not_converted'}", "--world-size", "1"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "has no config.json yet and student.arch='tiny' is not a GeoChat preset" in error
    assert "set student.arch to one of geochat-7b, geochat-13b" in error


def test_largest_micro_batch_is_the_boundary_of_the_verdict(tokenizer_dir):
    overrides = [f"data.tokenizer={tokenizer_dir}", "data.max_length=64", "student.attn_implementation=eager"]
    config = load_config(None, overrides)
    budget = dict(world_size=1, gpu_memory_gib=0.05, context_gib=0.0)
    largest = make_plan(config, **budget)["largest_micro_batch"]
    assert largest > 1

    def fits(micro: int) -> bool:
        config = load_config(None, [*overrides, f"train.micro_batch_size={micro}"])
        return make_plan(config, **budget)["verdict"]["fits"]

    assert fits(largest) and not fits(largest + 1)
    assert make_plan(config, world_size=1, gpu_memory_gib=0.001, context_gib=0.0)["largest_micro_batch"] == 0


def test_batch_only_prints_the_arithmetic_and_refuses_a_disagreement(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["--config", str(STAGE1), "--world-size", "8", "--batch-only"]) == 0
    assert capsys.readouterr().out.strip() == ("batch: 4 samples x 4 accumulation x 8 ranks = 128 samples per "
                                               "optimizer step (train.global_batch_size=128, as designed)")
    assert main(["--config", str(STAGE1), "--world-size", "16", "--gpus-per-node", "8", "--batch-only"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: train.global_batch_size=128 needs 8 ranks at 4 x 4 per rank, but this launch has 16 (256 samples "
        "per step): change the allocation, train.grad_accum, or train.global_batch_size")
    assert main(["--config", str(STAGE1), "--world-size", "16", "--batch-only", "train.grad_accum=2"]) == 0

"""``make gpu-check`` (bench/gpu_check.py) and its stage-1 MFU measurement (bench/bench_stage1_mfu.py), on the CPU:
argument parsing, the refusal without CUDA, the FLOP count against torch's FlopCounterMode, the tiny MFU dry run,
and the whole check in ``--dry-run`` (CPU stand-ins, the GPU tier collected and skipped)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench import bench_stage1_mfu, gpu_check
from kd_pipeline.data.collate import collate_right_padded
from kd_pipeline.models.layout import unwrap_model
from tests import batch_cases as cases

ROOT = Path(__file__).resolve().parents[2]
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without CUDA")


def addmm_inplace_flops(input_shape, left_shape, right_shape, **kwargs) -> int:
    """FlopCounterMode has no formula for the in-place ``addmm_`` the fused KL accumulates its weight gradient with."""
    return 2 * left_shape[0] * left_shape[1] * right_shape[1]


def test_step_flops_equal_what_flop_counter_mode_counts_in_a_stage1_step():
    """Teacher forward + student forward and backward on one sample at a time (no padding: every product is useful),
    eager attention so that attention's matrix products are visible to the counter."""
    student, teacher = cases.student_and_teacher("kd_sft", "eager")
    student_config, teacher_config = unwrap_model(student.llava).config, unwrap_model(teacher.llava).config
    for item in [item for item in cases.micro_batch() if item.pixel_values is not None]:
        batch = collate_right_padded([item], pad_id=cases.PAD_ID, image_size=cases.IMAGE_SIZE)
        with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: addmm_inplace_flops}) as counter:
            cases.loss_and_grads(student, teacher, batch, cases.KD_SETTINGS["kd_sft"])
        assert bench_stage1_mfu.step_flops(student_config, teacher_config, [item], cases.NUM_IMAGE_TOKENS) == \
            counter.get_total_flops()


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0),
                                        ("NVIDIA H100 NVL", 835.0), ("NVIDIA H200", 989.4), ("NVIDIA H200 NVL", 835.0),
                                        ("NVIDIA A100-SXM4-80GB", 312.0), ("Tesla T4", None)])
def test_peak_by_device_name(name, peak):
    assert bench_stage1_mfu.peak_tflops(name) == peak


def test_mfu_arguments_are_checked():
    with pytest.raises(SystemExit):
        bench_stage1_mfu.parse_args(["--steps", "0"])
    args = bench_stage1_mfu.parse_args(["--tiny", "--device", "cpu"])
    assert (args.micro_batch_size, args.warmup, args.steps, args.device) == (4, 2, 6, "cpu")


@pytest.mark.slow
def test_mfu_dry_run_on_cpu_measures_both_layouts(tmp_path):
    output = tmp_path / "mfu.json"
    result = subprocess.run([sys.executable, "bench/bench_stage1_mfu.py", "--device", "cpu", "--tiny", "--warmup", "1",
                             "--steps", "2", "--micro-batch-size", "3", "--peak-tflops", "0.5", "--output",
                             str(output)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["device"] == "cpu" and report["sizes"] == "tiny" and report["peak_bf16_tflops"] == 0.5
    assert report["parameters"]["teacher"] > report["parameters"]["student"] > 0
    padded, packed = report["layouts"]["padded"], report["layouts"]["packed"]
    assert padded["real_tokens_per_step"] == packed["real_tokens_per_step"]
    assert packed["model_positions_per_step"] <= padded["model_positions_per_step"]
    for numbers in (padded, packed):
        assert len(numbers["step_s_all"]) == 3 and numbers["step_s"] > 0 and 0 < numbers["non_pad_fraction"] <= 1
        flops_per_s = report["flops_per_step"] / numbers["step_s"]
        assert numbers["model_tflops_per_s"] == pytest.approx(flops_per_s / 1e12)
        assert numbers["mfu"] == pytest.approx(flops_per_s / 0.5e12)


def test_gpu_check_plans_cuda_parts_and_cpu_stand_ins(tmp_path):
    real = {part.name: part for part in gpu_check.plan_parts(tmp_path, dry_run=False)}
    dry = {part.name: part for part in gpu_check.plan_parts(tmp_path, dry_run=True)}
    assert list(real) == list(dry) == ["gpu_tier", "stage1_mfu", "kd_loss", "sampler"]
    for name, part in real.items():
        assert part.output == str(tmp_path / f"{name}_cuda.json")
        assert dry[name].output == str(tmp_path / f"{name}_cpu_dry.json")
    for name in ("stage1_mfu", "kd_loss", "sampler"):
        assert real[name].arguments[real[name].arguments.index("--device") + 1] == "cuda"
        assert dry[name].arguments[dry[name].arguments.index("--device") + 1] == "cpu"
    assert real["gpu_tier"].arguments[-1] == "tests" and "gpu" in real["gpu_tier"].arguments
    assert "--tiny" in dry["stage1_mfu"].arguments and "--tiny" not in real["stage1_mfu"].arguments
    assert sum(part.limit_s for part in real.values()) >= gpu_check.BUDGET_S  # the budget, not the parts, binds


def test_tier_summary_counts_outcomes_and_keeps_failure_messages(tmp_path):
    junit = tmp_path / "tier.xml"
    junit.write_text("""<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="4">
<testcase classname="tests.gpu.test_a" name="test_ok" time="0.1"/>
<testcase classname="tests.gpu.test_a" name="test_bad"><failure message="assert 1 == 2">trace</failure></testcase>
<testcase classname="tests.gpu.test_b" name="test_err"><error message="fixture broke">trace</error></testcase>
<testcase classname="tests.gpu.test_b" name="test_flash"><skipped message="flash-attn is not installed"/></testcase>
</testsuite></testsuites>""")
    summary = gpu_check.tier_summary(junit)
    assert {key: summary[key] for key in ("tests", "passed", "failed", "skipped")} == \
        {"tests": 4, "passed": 1, "failed": 2, "skipped": 1}
    assert summary["failures"] == [{"test": "tests.gpu.test_a::test_bad", "message": "assert 1 == 2"},
                                   {"test": "tests.gpu.test_b::test_err", "message": "fixture broke"}]
    assert summary["skip_reasons"] == {"flash-attn is not installed": 1}


@needs_no_cuda
def test_gpu_check_refuses_without_cuda(tmp_path, capsys):
    assert gpu_check.main(["--results", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err and not any(tmp_path.iterdir())


@pytest.mark.slow
@needs_no_cuda
def test_gpu_check_dry_run_runs_every_part_on_the_cpu(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry-run", "--results", str(tmp_path),
                             "--budget", "1500"], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    summary = json.loads((tmp_path / "gpu_check_cpu_dry.json").read_text())
    assert result.returncode == 0, json.dumps(summary, indent=1)[-4000:]
    assert summary["dry_run"] and summary["device"] == "cpu"
    assert {name: outcome["status"] for name, outcome in summary["parts"].items()} == dict.fromkeys(
        ("gpu_tier", "stage1_mfu", "kd_loss", "sampler"), "ok")
    for name in ("gpu_tier", "stage1_mfu", "kd_loss", "sampler"):
        report = json.loads((tmp_path / f"{name}_cpu_dry.json").read_text())
        assert report["gpu_check"]["device"] == "cpu" and report["gpu_check"]["torch"] == torch.__version__
        assert (tmp_path / "logs" / f"{name}.log").is_file()
    tier = json.loads((tmp_path / "gpu_tier_cpu_dry.json").read_text())
    assert tier["tests"] == tier["skipped"] >= 40 and tier["failures"] == []
    assert any("needs a CUDA GPU" in reason for reason in tier["skip_reasons"])
    mfu = json.loads((tmp_path / "stage1_mfu_cpu_dry.json").read_text())
    assert set(mfu["layouts"]) == {"padded", "packed"} and mfu["flops_per_step"] > 0
    kd_loss = json.loads((tmp_path / "kd_loss_cpu_dry.json").read_text())
    assert {row["method"] for row in kd_loss["summary"]} >= {"plain", "fused", "fused_weighted"}

"""Per-rank memory plan of a run before it is launched, with a verdict against the device (and the batch check the
launch scripts run at start).

Runbook::

    python -m kd_pipeline.plan --config configs/geochat_13b_to_7b.yaml \
        --config configs/geochat_13b_to_7b_stage2.yaml --world-size 8 --gpu-memory-gib 80     # both stages
    python -m kd_pipeline.plan student.arch=geochat-7b teacher.arch=geochat-13b student.image_size=504 \
        teacher.image_size=504 --world-size 8 [--json]
    python -m kd_pipeline.plan --config CONFIG --world-size 8 --batch-only   # what launch/*.sh run at start

What is counted and how: ``kd_pipeline.memory`` (model states of student and teacher, ZeRO-3's buffers, a stated
CUDA/NCCL context, activations, stage 2's rollout peak, the checkpoint size). Verdict: a stage fits when its peak
is at most 90 % of the device (``--gpu-memory-gib``, or CUDA's own total when a GPU is present): the rest is left
to the allocator's fragmentation. The largest ``train.micro_batch_size`` that fits is searched with everything else
unchanged. README's operator's guide sizes Slurm's grace time from the checkpoint row.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from dataclasses import asdict

from kd_pipeline.config import Config, ConfigError, help_text, load_config
from kd_pipeline.errors import user_errors_exit
from kd_pipeline.memory import (GIB, Counts, checkpoint_size, count_models, memory_rows, phase_totals,
                                trainable_states)

log = logging.getLogger(__name__)

USABLE_FRACTION = 0.9
"""Share of the device a plan may fill; the rest is left to allocator fragmentation."""
DEFAULT_CONTEXT_GIB = 1.5
MAX_MICRO_BATCH = 4096


# ----------------------------------------------------------------------------------------------------- the plan


def _nodes(world_size: int, gpus_per_node: int | None) -> tuple[int, int]:
    gpus_per_node = gpus_per_node or min(world_size, 8)
    if world_size < 1 or gpus_per_node < 1 or world_size % gpus_per_node:
        raise ConfigError(f"--world-size {world_size} is not a multiple of --gpus-per-node {gpus_per_node}")
    return gpus_per_node, world_size // gpus_per_node


def device_memory(gpu_memory_gib: float | None) -> tuple[int | None, str]:
    """(bytes, where from): ``--gpu-memory-gib``, else CUDA's total for device 0, else (None, ...)."""
    if gpu_memory_gib:
        return int(gpu_memory_gib * GIB), "--gpu-memory-gib"
    import torch

    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        return int(properties.total_memory), f"CUDA: {properties.name}"
    return None, "no --gpu-memory-gib and no CUDA device"


def verdict(peak: int, device: int | None) -> dict:
    if device is None:
        return {"fits": None, "text": "no verdict: pass --gpu-memory-gib"}
    usable = int(USABLE_FRACTION * device)
    fits = peak <= usable
    text = (f"fits, {(usable - peak) / GIB:.2f} GiB headroom" if fits else
            f"does not fit: {(peak - usable) / GIB:.2f} GiB over") + \
        f" (peak {peak / GIB:.2f} of {usable / GIB:.2f} GiB usable = {USABLE_FRACTION:.0%} of {device / GIB:.2f})"
    return {"fits": fits, "usable": usable, "text": text}


def largest_micro_batch(config: Config, counts: Counts, device: int | None, **layout) -> int | None:
    """The largest ``train.micro_batch_size`` whose peak fits (0: not even 1), everything else unchanged; in stage 2
    among the divisors of ``minillm.rollouts_per_rank``."""
    if device is None:
        return None
    usable = int(USABLE_FRACTION * device)

    def fits(micro: int) -> bool:
        train = dataclasses.replace(config.train, micro_batch_size=micro, grad_accum=1, global_batch_size=0)
        return phase_totals(memory_rows(dataclasses.replace(config, train=train), counts, **layout))["peak"] <= usable

    if config.run.stage == "minillm":  # the rollout buffer splits into whole micro-batches
        rollouts = config.minillm.rollouts_per_rank
        return max((micro for micro in range(1, rollouts + 1) if rollouts % micro == 0 and fits(micro)), default=0)
    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= MAX_MICRO_BATCH and fits(high):
        low, high = high, high * 2
    high = min(high, MAX_MICRO_BATCH + 1)
    while high - low > 1:  # fits(low) and not fits(high): peak grows with the micro-batch
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def make_plan(config: Config, *, world_size: int, gpus_per_node: int | None = None,
              gpu_memory_gib: float | None = None, context_gib: float = DEFAULT_CONTEXT_GIB) -> dict:
    """The whole plan as plain data (bytes); ``format_table`` renders it."""
    gpus_per_node, num_nodes = _nodes(world_size, gpus_per_node)
    counts = count_models(config, world_size=world_size)
    layout = dict(world_size=world_size, gpus_per_node=gpus_per_node, num_nodes=num_nodes,
                  context_bytes=int(context_gib * GIB))
    rows = memory_rows(config, counts, **layout)
    totals = phase_totals(rows)
    device, device_source = device_memory(gpu_memory_gib)
    all_cpu, all_gpu = trainable_states(counts.student.total, counts.student.largest_layer, counts.student_zero,
                                        gpus_per_node=gpus_per_node, num_nodes=num_nodes)
    return {
        "world_size": world_size, "gpus_per_node": gpus_per_node, "num_nodes": num_nodes,
        "stage": config.run.stage, "student_zero": asdict(counts.student_zero), "notes": list(counts.notes),
        "student": {**asdict(counts.student), "arch": config.student.arch, "path": config.student.path,
                    "lora": config.student.lora},
        "teacher": None if counts.teacher is None else {**asdict(counts.teacher), "arch": config.teacher.arch,
                                                        "path": config.teacher.path},
        "rows": rows,
        "phases": totals,
        "total": {"gpu": totals["peak"], "cpu": sum(row["cpu"] for row in rows)},
        "device": {"bytes": device, "source": device_source},
        "verdict": verdict(totals["peak"], device),
        "largest_micro_batch": largest_micro_batch(config, counts, device, **layout),
        "checkpoint": checkpoint_size(config, counts, world_size=world_size),
        "batch": batch_arithmetic(config, world_size),
        "deepspeed_all_trainable": {"gpu": all_gpu, "cpu": all_cpu, "params": counts.student.total},
    }


def format_table(plan: dict) -> str:
    """The plan as a fixed-width table in GiB (2**30 bytes)."""
    zero = plan["student_zero"]
    offload = [name for name, on in (("optimizer", zero["offload_optimizer"]), ("params", zero["offload_param"])) if on]
    student, teacher = plan["student"], plan["teacher"]
    lines = [f"memory plan, stage {plan['stage']}: student {student['path'] or student['arch']}"
             f"{' (LoRA)' if student['lora'] else ''} + teacher "
             f"{'none' if teacher is None else teacher['path'] or teacher['arch']}, ZeRO-{zero['stage']} (offload: "
             f"{', '.join(offload) or 'none'}), {plan['world_size']} rank(s) = {plan['num_nodes']} node(s) x "
             f"{plan['gpus_per_node']}, bf16"]
    lines += [f"note: {note}" for note in plan["notes"]]
    lines.append(f"{'component':<30}{'phase':>8}{'params':>12}{'GPU/rank GiB':>14}{'CPU/node GiB':>14}  how")
    for row in plan["rows"]:
        params = f"{row['params'] / 1e6:,.1f}M" if row["params"] else ""
        lines.append(f"{row['name']:<30}{row['phase']:>8}{params:>12}{row['gpu'] / GIB:>14.2f}"
                     f"{row['cpu'] / GIB:>14.2f}  {row['how']}")
    for phase, total in plan["phases"].items():
        if phase != "peak":
            lines.append(f"{'total, ' + phase + ' phase':<30}{'':>8}{'':>12}{total / GIB:>14.2f}")
    lines.append(f"{'peak':<30}{'':>8}{'':>12}{plan['phases']['peak'] / GIB:>14.2f}"
                 f"{plan['total']['cpu'] / GIB:>14.2f}")
    device = plan["device"]
    lines.append(f"verdict ({device['source']}): {plan['verdict']['text']}")
    if plan["largest_micro_batch"] is not None:
        lines.append(f"largest train.micro_batch_size that fits: {plan['largest_micro_batch'] or 'none (not even 1)'}"
                     f" (this config: {plan['batch']['micro_batch_size']})")
    checkpoint = plan["checkpoint"]
    lines.append(f"checkpoint: {checkpoint['bytes'] / GIB:.2f} GiB per save, {checkpoint['per_rank'] / GIB:.2f} GiB "
                 f"per rank (ZeRO: 12 B/trainable + 2 B/frozen param; rollout buffers)")
    lines.append(plan["batch"]["text"])
    reference = plan["deepspeed_all_trainable"]
    lines.append(f"reference: DeepSpeed's estimator with all {reference['params'] / 1e6:,.1f}M student params "
                 f"trainable: {reference['gpu'] / GIB:.2f} GiB GPU/rank, {reference['cpu'] / GIB:.2f} GiB CPU/node")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- launch check


def batch_arithmetic(config: Config, world_size: int) -> dict:
    """The global batch ``world_size`` ranks give this config, checked against ``train.global_batch_size``."""
    micro, accum = config.train.micro_batch_size, config.train.grad_accum
    global_batch = micro * accum * world_size
    stated = config.train.global_batch_size
    text = (f"batch: {micro} samples x {accum} accumulation x {world_size} ranks = {global_batch} samples per "
            f"optimizer step")
    if stated:
        text += f" (train.global_batch_size={stated}{', as designed' if stated == global_batch else ''})"
    return {"micro_batch_size": micro, "grad_accum": accum, "world_size": world_size, "global": global_batch,
            "stated": stated, "text": text}


def check_batch(config: Config, world_size: int) -> dict:
    """``batch_arithmetic``, raising ``ConfigError`` when the ranks give another global batch than the config's."""
    batch = batch_arithmetic(config, world_size)
    if batch["stated"] and batch["stated"] != batch["global"]:
        per_rank = batch["micro_batch_size"] * batch["grad_accum"]
        raise ConfigError(
            f"train.global_batch_size={batch['stated']} needs {batch['stated'] // per_rank} ranks at "
            f"{batch['micro_batch_size']} x {batch['grad_accum']} per rank, but this launch has {world_size} "
            f"({batch['global']} samples per step): change the allocation, train.grad_accum, or "
            f"train.global_batch_size")
    return batch


# ----------------------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kd_pipeline.plan",
                                     description="Per-rank memory plan of a run, with a verdict against the device.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=help_text())
    parser.add_argument("--config", action="append", default=[],
                        help="run YAML; repeat it to plan several (e.g. stage 1 and stage 2); omitted keys keep "
                             "their defaults")
    parser.add_argument("--world-size", type=int, default=1, help="ranks (GPUs) in the run")
    parser.add_argument("--gpus-per-node", type=int, default=None, help="GPUs per node (default: min(world, 8))")
    parser.add_argument("--gpu-memory-gib", type=float, default=None,
                        help="memory of one GPU in GiB for the verdict (default: read from CUDA when present)")
    parser.add_argument("--context-gib", type=float, default=DEFAULT_CONTEXT_GIB,
                        help=f"CUDA context + NCCL buffers per rank (default {DEFAULT_CONTEXT_GIB})")
    parser.add_argument("--batch-only", action="store_true",
                        help="print only the batch arithmetic for --world-size (no model counting); exit 2 when it "
                             "disagrees with train.global_batch_size")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON (bytes) instead of a table")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides applied after each YAML")
    return parser.parse_intermixed_args(argv)  # overrides may come before or after the options


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    outputs = []
    for path in args.config or [None]:
        config = load_config(path, args.overrides)
        if args.batch_only:
            outputs.append(check_batch(config, args.world_size))
        else:
            outputs.append(make_plan(config, world_size=args.world_size, gpus_per_node=args.gpus_per_node,
                                     gpu_memory_gib=args.gpu_memory_gib, context_gib=args.context_gib))
    if args.json:
        print(json.dumps(outputs[0] if len(outputs) == 1 else outputs, indent=2))
    elif args.batch_only:
        print("\n".join(batch["text"] for batch in outputs))
    else:
        print("\n\n".join(format_table(plan) for plan in outputs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

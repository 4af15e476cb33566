"""Rank-0 metrics: ``metrics.jsonl`` (one JSON object per logged step), TensorBoard events, and the progress bar.

``METRICS`` is the one vocabulary of both stages: the same name means the same quantity in every stage that has it,
each name has its TensorBoard group (``train/``, ``val/``, ``stage2/``) and a one-line meaning, and the logger
refuses a name that is not in it. README's metrics table is generated from it (``metrics_reference``; a test keeps
it current). Every line also has ``step``. On resume the lines after the resumed step are dropped first, so the
file always describes one consistent run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from kd_pipeline.engine.collectives import MAX, SUM, all_reduce_floats

ALL_STAGES = "sft, kd_sft, minillm"
SUPERVISED = "sft, kd_sft"


@dataclass(frozen=True)
class Metric:
    group: str    # TensorBoard group: train, val or stage2
    stages: str   # the run.stage values whose lines carry it
    meaning: str


METRICS: dict[str, Metric] = {
    "loss": Metric("train", ALL_STAGES, "the optimised objective, averaged over the step's micro-batches and ranks"),
    "ce": Metric("train", SUPERVISED, "student cross-entropy per supervised token (global token mean of the step)"),
    "kd": Metric("train", "kd_sft", "tau^2 KL(p_T ‖ p_S) per supervised token (global token mean of the step)"),
    "align": Metric("train", "kd_sft, minillm",
                    "feature alignment ½·mean over image tokens and features of (z_T − P(z_S))² (a mean squared "
                    "error; computed and logged whatever its weight)"),
    "pg_loss": Metric("train", "minillm", "PPO-clipped long-term policy-gradient term"),
    "single_step_loss": Metric("train", "minillm", "single-step term: exact reverse KL per response token"),
    "pt_loss": Metric("train", "minillm", "D_PT loss (1 - kd_ratio) LM + kd_ratio KD (absent when pt_weight is 0)"),
    "loss_ce": Metric("train", "kd_sft", "what CE adds to `loss`: (1 - kd.alpha_kd) x ce"),
    "loss_kd": Metric("train", "kd_sft", "what word-level KD adds to `loss`: kd.alpha_kd x kd"),
    "loss_align": Metric("train", "kd_sft, minillm",
                         "what alignment adds to `loss`: kd.align_weight (stage 1) or minillm.align_weight (stage 2) "
                         "x align"),
    "loss_long_term": Metric("train", "minillm", "what the long-term term adds: minillm.long_term_weight x pg_loss"),
    "loss_single_step": Metric("train", "minillm",
                               "what the single-step term adds: minillm.single_step_weight x single_step_loss"),
    "loss_pt": Metric("train", "minillm", "what the PT loss adds: minillm.pt_weight x pt_loss (the `loss_*` of a "
                                          "line sum to `loss`)"),
    "rev_kl": Metric("stage2", "minillm",
                     "exact reverse KL(q ‖ p) per response token of the step, token-weighted over ranks"),
    "clip_frac": Metric("stage2", "minillm", "share of the step's response tokens where PPO's clip is active"),
    "reward": Metric("stage2", "minillm", "log p - log q per token of the latest rollout round, all ranks"),
    "w_mean": Metric("stage2", "minillm", "token-weighted mean importance weight of the latest round, all ranks"),
    "w_max": Metric("stage2", "minillm", "largest importance weight of the latest round on any rank (all-reduce MAX)"),
    "len_mixed": Metric("stage2", "minillm", "mean length of the latest round's teacher-mixed rollouts"),
    "lr": Metric("train", ALL_STAGES, "learning rate after the step"),
    "tokens_per_s": Metric("train", ALL_STAGES,
                           "tokens through the student per second of the step, all ranks (stage 2: rollout "
                           "sequences and D_PT batches)"),
    "data_wait_frac": Metric("train", ALL_STAGES, "share of the step spent waiting for the loaders"),
    "step_time_s": Metric("train", ALL_STAGES, "seconds of the step (stage 2: with any rollout round collected in it)"),
    "val_loss": Metric("val", ALL_STAGES,
                       "validation objective that picks `best`: token-weighted loss on the val split (sft, kd_sft); "
                       "exact reverse KL per token of student-only answers (minillm)"),
    "val_ce": Metric("val", SUPERVISED, "cross-entropy per supervised val token"),
    "val_kd": Metric("val", "kd_sft", "tau^2 KL(p_T ‖ p_S) per supervised val token"),
    "val_align": Metric("val", "kd_sft", "feature alignment (the mean squared error of `align`) on the val split"),
    "val_rev_kl_seq": Metric("val", "minillm", "reverse KL summed per student-only answer, averaged over answers"),
    "val_len_student": Metric("val", "minillm", "mean length of the student-only validation answers"),
}

# What each term adds to the loss (weight x term) is logged as CONTRIBUTION_PREFIX + the term's name.
CONTRIBUTION_PREFIX = "loss_"
# Shown on the progress bar when present (the full record goes to metrics.jsonl and TensorBoard): the loss and what
# each of its terms adds, so the bar shows at once which term dominates.
PROGRESS_KEYS = ("loss", "loss_ce", "loss_kd", "loss_align", "loss_long_term", "loss_single_step", "loss_pt", "ce",
                 "rev_kl", "reward", "val_loss", "tokens_per_s", "data_wait_frac")


def tensorboard_tag(name: str) -> str:
    """``val_ce`` -> ``val/ce``, ``w_max`` -> ``stage2/w_max``, ``loss`` -> ``train/loss``."""
    group = METRICS[name].group
    return f"{group}/{name.removeprefix('val_') if group == 'val' else name}"


def metrics_reference() -> str:
    """README's metrics.jsonl table, from ``METRICS`` (meanings must not contain a bare ``|``)."""
    lines = ["| key | stages | TensorBoard | meaning |", "| --- | --- | --- | --- |"]
    lines += [f"| `{name}` | {metric.stages} | `{tensorboard_tag(name)}` | {metric.meaning} |"
              for name, metric in METRICS.items()]
    return "\n".join(lines)


def _all_reduce(values: dict[str, float], op) -> dict[str, float]:
    """One all-reduce with ``op`` for all of ``values`` (keys in sorted order on every rank)."""
    keys = sorted(values)
    return dict(zip(keys, all_reduce_floats([values[key] for key in keys], op)))


def reduce_sum(values: dict[str, float]) -> dict[str, float]:
    """Sum scalar metrics over ranks."""
    return _all_reduce(values, SUM)


def reduce_mean(values: dict[str, float], world_size: int) -> dict[str, float]:
    """Average scalar metrics over the ``world_size`` ranks (each rank weighs the same)."""
    return {key: value / world_size for key, value in reduce_sum(values).items()}


def reduce_max(values: dict[str, float]) -> dict[str, float]:
    """Maximum of scalar metrics over ranks (a mean of per-rank maxima would hide one rank's outlier)."""
    return _all_reduce(values, MAX)


class MetricsLogger:
    def __init__(self, output_dir: Path, *, enabled: bool, total_steps: int, start_step: int):
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self.writer = None
        self.bar = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(output_dir / "tensorboard"))
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, record: dict[str, float]) -> None:
        unknown = sorted(set(record) - set(METRICS))
        if unknown:  # on every rank: a new name must be added to the vocabulary (and README) first
            raise KeyError(f"metrics {unknown} are not in kd_pipeline.engine.metrics.METRICS: add each with its "
                           f"group, stages and meaning")
        if not self.enabled:
            return
        line = {"step": step, **{key: round(float(value), 8) for key, value in record.items()}}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(line) + "\n")
        for key, value in record.items():
            self.writer.add_scalar(tensorboard_tag(key), float(value), step)

    def progress(self, step: int, record: dict[str, float]) -> None:
        if not self.enabled:
            return
        shown = {key: f"{record[key]:.4g}" for key in PROGRESS_KEYS if key in record}
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.writer.close()

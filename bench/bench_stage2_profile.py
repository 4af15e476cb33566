"""Where a stage-2 round's time goes: each phase's share of the round, measured side by side in one run.

    python bench/bench_stage2_profile.py [--quick] [--rounds N] [section.key=value ...]

Runs the stage-2 recipe's own pieces (``kd_pipeline.recipes.minillm``) on one process with the engines training
builds (ZeRO-3; the tiny models of configs/tiny_cpu_stage2.yaml unless overridden), on a synthetic world that
``data_prep`` writes to a temporary folder. Per round, in the recipe's order:

- ``prompts``: waiting for the round's prompt batches;
- ``rollout``: decoding the whole buffer with both models' parameters gathered (``sample_buffer``);
- ``teacher scoring``: the teacher on every prompt + response, rewards, weights, whitened advantages;
- ``policy forward/backward``: per buffer micro-batch and PPO epoch, the student's PPO + single-step (+ alignment)
  forward, backward and optimizer step without a D_PT batch;
- ``PT batch``: what a D_PT batch adds to each of those steps: its fetch, and the same step with the batch (its
  teacher forward, its share of the student forward/backward) minus the step without it (interleaved A/B);
- ``save``: one checkpoint (counted once per round: training saves every ``checkpoint.every_steps`` steps instead).

``alignment`` is timed on its own (a plain ``FeatureProjector`` forward/backward on the round's feature shapes) and
reported as the part of ``policy forward/backward`` it is. Medians over ``--rounds`` rounds after one warm-up round.
Writes bench/results/stage2_profile_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kd_pipeline.config import load_config  # noqa: E402
from kd_pipeline.losses import FeatureProjector, alignment_loss  # noqa: E402
from kd_pipeline.progress import RolloutProgress  # noqa: E402
from kd_pipeline.recipes.common import open_session, to_device  # noqa: E402
from kd_pipeline.recipes.minillm import (_build_loaders, _policy_step, _whiten_advantages, sample_buffer,  # noqa: E402
                                         score_rollout)
from kd_pipeline.runtime import init_runtime  # noqa: E402

PHASES = ("prompts", "rollout", "teacher scoring", "policy forward/backward", "PT batch", "save")


def make_world(folder: Path) -> dict[str, Path]:
    """A small synthetic world, sharded, with its D_PT corpus and tokenizer (as the end-to-end tests make it)."""
    from data_prep.__main__ import main as data_prep

    steps = [["synth", "--out", str(folder / "synth"), "--num", "160", "--seed", "0", "--bench-num", "8"],
             ["shard", "--instruct", str(folder / "synth" / "instruct.json"), "--images", str(folder / "synth" / "images"),
              "--out", str(folder / "shards"), "--val-fraction", "0.1", "--max-shard-samples", "40", "--workers", "1"],
             ["pt", "--text", str(folder / "synth" / "pt_corpus.txt"), "--out", str(folder / "pt_shards")],
             ["tokenizer", "--instruct", str(folder / "synth" / "instruct.json"), "--text",
              str(folder / "synth" / "pt_corpus.txt"), "--out", str(folder / "tokenizer"), "--vocab-size", "600"]]
    for arguments in steps:
        if data_prep(arguments) != 0:
            raise SystemExit(f"data_prep {' '.join(arguments)} failed")
    return {"shards": folder / "shards", "pt_shards": folder / "pt_shards", "tokenizer": folder / "tokenizer"}


class PhaseTimer:
    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def __call__(self, phase: str):
        self.sync()
        start = time.perf_counter()
        yield
        self.sync()
        self.seconds[phase] += time.perf_counter() - start


def alignment_seconds(config, entry: dict, device: torch.device) -> float:
    """Forward + backward of the alignment term alone on this micro-batch's feature shapes."""
    teacher_features = entry["teacher_features"].float()  # (N_img, T_img, Ht)
    projector = FeatureProjector(config.student.hidden_size, teacher_features.shape[-1]).to(device)
    features = torch.randn(*teacher_features.shape[:2], config.student.hidden_size, device=device,
                           requires_grad=True)  # (N_img, T_img, Hs)
    timer = PhaseTimer(device)
    with timer("alignment"):
        alignment_loss(projector(features), teacher_features).backward()
    return timer.seconds["alignment"]


def profile_round(session, loaders, batches: dict, progress: RolloutProgress) -> dict[str, float]:
    """One round, phase by phase, with the recipe's functions; returns seconds per phase."""
    config, runtime, engines = session.config, session.runtime, session.engines
    timer = PhaseTimer(runtime.device)
    count = config.minillm.rollouts_per_rank // config.train.micro_batch_size
    with timer("prompts"):
        prompts = [to_device(next(batches["prompt"]), runtime.device, runtime.dtype) for _ in range(count)]
    with timer("rollout"):
        rollouts = sample_buffer(engines, config, runtime, prompts, progress.generator, config.minillm.mix_alpha)
    with torch.no_grad(), timer("teacher scoring"):
        buffer = [score_rollout(engines, config, batch, rollout) for batch, rollout in zip(prompts, rollouts)]
        if config.minillm.long_term == "minillm":
            _whiten_advantages(buffer)

    def step(entry: dict, pt_batch: dict | None) -> None:
        terms = _policy_step(engines, config, entry, pt_batch)
        engines.student.backward(terms["loss"])
        engines.student.step()

    for _ in range(config.minillm.ppo_epochs):
        for entry in buffer:
            with timer("PT batch"):  # the fetch; the compute is added below as full - policy
                pt_batch = to_device(next(batches["pt"]), runtime.device, runtime.dtype)
            with timer("policy forward/backward"):
                step(entry, None)
            with timer("full step"):
                step(entry, pt_batch)
            timer.seconds["alignment"] += alignment_seconds(config, entry, runtime.device)
    timer.seconds["PT batch"] += timer.seconds.pop("full step") - timer.seconds["policy forward/backward"]
    progress.buffer, progress.position = buffer, 0
    session.state.step += 1
    with timer("save"):
        session.save(loaders["train"], extra={"rollout": progress.payload()})
    return dict(timer.seconds)


def summarise(rounds: list[dict[str, float]]) -> dict:
    medians = {phase: statistics.median(seconds[phase] for seconds in rounds) for phase in (*PHASES, "alignment")}
    total = sum(medians[phase] for phase in PHASES)
    return {"round_s": total, "median_s": medians,
            "share": {phase: medians[phase] / total for phase in (*PHASES, "alignment")}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one timed round")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (after one warm-up round)")
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny_cpu_stage2.yaml"))
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. minillm.rollouts_per_rank=16")
    args = parser.parse_args(argv)
    rounds = 1 if args.quick else args.rounds
    with tempfile.TemporaryDirectory() as scratch:
        world = make_world(Path(scratch))
        config = load_config(args.config, [
            f"data.shards={world['shards']}", f"data.pt_shards={world['pt_shards']}",
            f"data.tokenizer={world['tokenizer']}", f"run.output_dir={scratch}/run", "checkpoint.resume=none",
            "run.init_from=random-weights", "minillm.pt_weight=1.0", *args.overrides])
        runtime = init_runtime(5)
        session = open_session(config, runtime)  # random weights: the timings do not depend on them
        session.metrics.close()  # no training loop here: no progress bar, no metrics.jsonl
        loaders = _build_loaders(session)
        session.restore_rng()
        batches = {name: iter(loader) for name, loader in loaders["train"].items()}
        progress = RolloutProgress(torch.Generator(device=runtime.device).manual_seed(0))
        measured = [profile_round(session, loaders, batches, progress) for _ in range(rounds + 1)][1:]
    config_name = Path(args.config).resolve()
    config_name = config_name.relative_to(ROOT) if config_name.is_relative_to(ROOT) else config_name
    result = {"device": str(runtime.device), "rounds": rounds, "config": str(config_name), "overrides": args.overrides,
              "micro_steps_per_round": len(progress.buffer) * config.minillm.ppo_epochs, **summarise(measured)}
    print(f"{'phase':<26}{'s / round':>11}{'share':>8}")
    for phase in (*PHASES, "alignment"):
        label = "  of which alignment" if phase == "alignment" else phase
        print(f"{label:<26}{result['median_s'][phase]:>11.3f}{100 * result['share'][phase]:>7.1f}%")
    print(f"{'round':<26}{result['round_s']:>11.3f}   ({result['micro_steps_per_round']} micro-steps per round)")
    out = ROOT / "bench" / "results" / f"stage2_profile_{runtime.device.type}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The embedded default: the whole paper at micro scale on one box. ``make demo`` runs
``python -m kd_pipeline.demo --out demo_out``.

Phases (each the real command-line tool, run as a user would; a phase whose output is already complete is skipped,
so an interrupted demo continues where it stopped):

 1. data      data_prep synth -> shard -> verify; pt corpus; tokenizer; the four benchmark sets (data_prep bench)
 2. teacher   a larger tiny model trained alone (run.stage=sft, 2 ranks), exported
 3. baseline  a smaller tiny model trained alone (the student without distillation), exported
 4. stage 1   word-level KD + projector alignment from the teacher into the baseline (kd_sft, 2 ranks)
 5. stage 2   reverse-KL policy gradient with teacher-mixed sampling from stage 1's best checkpoint (minillm)
 6. eval      teacher, baseline and distilled student on scene classification, VQA, grounding and region
              captioning (eval run), the paper-style table printed and written to report.md with the plots

``--quick`` shrinks every phase (a couple of minutes; part of the test suite); ``--scale gpu`` trains larger tiny
models for longer on a GPU box. Exit code 0 when every phase succeeded.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("kd_pipeline.demo")
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "demo"
EVAL_TASKS = {"aid": "scene", "lrben": "vqa", "referring": "referring", "region_captioning": "region_captioning"}


@dataclass(frozen=True)
class Scale:
    """How big each phase is. Step counts were tuned so the CPU demo stays within 15 minutes on 2 cores."""
    records: int
    bench: int
    teacher_steps: int
    student_steps: int
    stage1_steps: int
    stage2_steps: int
    eval_every: int
    nproc: int = 2
    max_new_tokens: int = 48
    overrides: tuple[str, ...] = ()


SCALES = {
    "quick": Scale(records=240, bench=16, teacher_steps=12, student_steps=12, stage1_steps=6, stage2_steps=4,
                   eval_every=6, max_new_tokens=24),
    "cpu": Scale(records=2000, bench=50, teacher_steps=240, student_steps=240, stage1_steps=100, stage2_steps=24,
                 eval_every=40, max_new_tokens=40),
    "gpu": Scale(records=20000, bench=400, teacher_steps=3000, student_steps=3000, stage1_steps=1500,
                 stage2_steps=400, eval_every=250, nproc=1,
                 overrides=("train.micro_batch_size=32",)),
}


class Demo:
    def __init__(self, out: Path, scale: Scale, seed: int):
        self.out, self.scale, self.seed = out, scale, seed
        self.data, self.runs, self.models = out / "data", out / "runs", out / "models"
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, float] = {}

    def _run(self, phase: str, command: list[str]) -> None:
        """Run one tool; its progress bars go to the terminal, its full output to logs/<phase>.log."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        if not torch.cuda.is_available():  # CPU ranks: gloo and DeepSpeed's CPU accelerator
            env.setdefault("DS_ACCELERATOR", "cpu")
        with open(self.logs / f"{phase}.log", "a") as handle:
            handle.write(f"$ {' '.join(command)}\n")
            handle.flush()
            result = subprocess.run(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            tail = (self.logs / f"{phase}.log").read_text().splitlines()[-25:]
            raise RuntimeError(f"phase {phase} failed (exit {result.returncode}); last lines of "
                               f"{self.logs / f'{phase}.log'}:\n" + "\n".join(tail))

    def _python(self, *args: str) -> list[str]:
        return [sys.executable, "-m", *args]

    def _train(self, phase: str, config: str, output: Path, overrides: list[str]) -> None:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node", str(self.scale.nproc)]
        self._run(phase, [*launcher, "-m", "kd_pipeline.train", "--config", str(CONFIGS / config),
                          f"run.output_dir={output}", f"data.shards={self.data / 'shards'}",
                          f"data.tokenizer={self.data / 'tokenizer'}", f"train.eval_every={self.scale.eval_every}",
                          f"checkpoint.every_steps={self.scale.eval_every}", *self.scale.overrides, *overrides])

    def _export(self, phase: str, run_dir: Path, model_dir: Path) -> None:
        if not (model_dir / "config.json").is_file():
            self._run(phase, self._python("kd_pipeline.export", "--checkpoint", str(run_dir), "--out", str(model_dir)))

    def phase(self, number: int, name: str, description: str, done: bool, action) -> None:
        if done:
            log.info("[demo %d/6] %s: already complete, skipped", number, name)
            return
        log.info("[demo %d/6] %s: %s", number, name, description)
        start = time.perf_counter()
        action()
        self.timings[name] = time.perf_counter() - start
        log.info("[demo %d/6] %s done in %.0f s", number, name, self.timings[name])

    # ------------------------------------------------------------------------------------------------- phases

    def make_data(self) -> None:
        synth, data = self.data / "synth", self.data
        self._run("data", self._python("data_prep", "synth", "--out", str(synth), "--num", str(self.scale.records),
                                       "--seed", str(self.seed), "--bench-num", str(self.scale.bench), "--overwrite"))
        self._run("data", self._python("data_prep", "shard", "--instruct", str(synth / "instruct.json"), "--images",
                                       str(synth / "images"), "--out", str(data / "shards"), "--val-fraction", "0.05",
                                       "--max-shard-samples", str(max(self.scale.records // 16, 20)), "--workers", "2",
                                       "--seed", str(self.seed), "--resume"))
        self._run("data", self._python("data_prep", "verify", str(data / "shards")))
        # D_PT is text the models were pre-trained on (MiniLLM: the teacher's pre-training corpus). Here the only
        # "pre-training" both models had is the instruction data, so its answers are the corpus.
        records = json.loads((synth / "instruct.json").read_text())
        answers = {turn["value"].replace("\n", " ") for record in records for turn in record["conversations"]
                   if turn["from"] == "gpt"}
        (data / "pt_text.txt").write_text("".join(line + "\n" for line in sorted(answers)))
        self._run("data", self._python("data_prep", "pt", "--text", str(data / "pt_text.txt"), "--out",
                                       str(data / "pt_shards"), "--max-shard-samples", str(max(len(answers) // 8, 20)),
                                       "--resume"))
        self._run("data", self._python("data_prep", "tokenizer", "--instruct", str(synth / "instruct.json"),
                                       "--out", str(data / "tokenizer"), "--vocab-size", "1000"))
        for task, source in EVAL_TASKS.items():
            self._run("data", self._python("data_prep", "bench", "--task", task, "--questions",
                                           str(synth / "bench" / f"{source}.jsonl"), "--images",
                                           str(synth / "bench" / "images"), "--out", str(data / "bench")))
        (data / "DONE").write_text("ok")

    def train_teacher(self) -> None:
        self._train("teacher", "teacher_sft.yaml", self.runs / "teacher", [f"train.max_steps={self.scale.teacher_steps}"])
        self._export("teacher", self.runs / "teacher", self.models / "teacher")

    def train_baseline(self) -> None:
        self._train("baseline", "student_sft.yaml", self.runs / "baseline",
                    [f"train.max_steps={self.scale.student_steps}"])
        self._export("baseline", self.runs / "baseline", self.models / "baseline")

    def stage1(self) -> None:
        self._train("stage1", "stage1.yaml", self.runs / "stage1",
                    [f"train.max_steps={self.scale.stage1_steps}", f"student.path={self.models / 'baseline'}",
                     f"teacher.path={self.models / 'teacher'}"])

    def stage2(self) -> None:
        self._train("stage2", "stage2.yaml", self.runs / "stage2",
                    [f"train.max_steps={self.scale.stage2_steps}", f"student.path={self.models / 'baseline'}",
                     f"teacher.path={self.models / 'teacher'}", f"data.pt_shards={self.data / 'pt_shards'}",
                     f"run.init_from={self.runs / 'stage1'}",
                     f"train.eval_every={max(self.scale.stage2_steps // 2, 1)}"])
        self._export("stage2", self.runs / "stage2", self.models / "distilled")

    def evaluate(self) -> None:
        models = [f"{name}={self.models / name}" for name in ("teacher", "baseline", "distilled")]
        command = self._python("kd_pipeline.eval", "run", "--tasks", ",".join(EVAL_TASKS), "--data",
                               str(self.data / "bench"), "--out", str(self.out / "eval"), "--batch-size", "16",
                               "--max-new-tokens", str(self.scale.max_new_tokens))
        for model in models:
            command += ["--model", model]
        self._run("eval", command)

    def run(self) -> int:
        self.phase(1, "data", "synthetic world -> shards, pt corpus, tokenizer, benchmark sets",
                   (self.data / "DONE").is_file(), self.make_data)
        self.phase(2, "teacher", "training the teacher alone (sft)", (self.models / "teacher" / "config.json").is_file(),
                   self.train_teacher)
        self.phase(3, "baseline", "training the student alone (sft baseline)",
                   (self.models / "baseline" / "config.json").is_file(), self.train_baseline)
        self.phase(4, "stage1", "stage 1: word-level KD + feature alignment (kd_sft)",
                   (self.runs / "stage1" / "checkpoints" / "best").is_file() or
                   (self.models / "distilled" / "config.json").is_file(), self.stage1)
        self.phase(5, "stage2", "stage 2: reverse-KL policy gradient (minillm)",
                   (self.models / "distilled" / "config.json").is_file(), self.stage2)
        self.phase(6, "eval", "evaluating teacher, baseline and distilled student on the four tasks",
                   False, self.evaluate)
        report = self.out / "eval" / "report.md"
        print(report.read_text())
        summary = {"timings_s": self.timings, "report": str(report), "results": str(self.out / "eval" / "results.json")}
        (self.out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
        log.info("demo finished: %s (plots beside it)", report)
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kd_pipeline.demo", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (re-used to continue)")
    parser.add_argument("--quick", action="store_true", help="a couple of minutes: tiny data and step counts")
    parser.add_argument("--scale", choices=sorted(SCALES), default=None, help="cpu (default), gpu or quick")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic world")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    scale = SCALES["quick" if args.quick else (args.scale or "cpu")]
    try:
        return Demo(args.out.resolve(), scale, args.seed).run()
    except RuntimeError as error:
        log.error("%s", error)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""The task graph of one run of the experiment: per seed, worlds -> data -> teachers -> arms -> evaluations.

Layout under ``--out`` (one folder per seed; ``ab`` is the world of the paper and limited conditions, ``c`` the
ambiguous world)::

    seed0/worlds/{ab,c}/        data_prep synth --profile repro (2R records; c with --ambiguous)
    seed0/tokenizer/            data_prep tokenizer on both worlds' records
    seed0/sets/<set>/           instruct.json + shards/ of each labelled set: ab_S (first R records: the teacher's
                                set and the paper student's), ab_half (first R/2: the limited student's),
                                ab_double (all 2R: P of paper), c_S, c_double
    seed0/pt/{ab,c}/            D_PT for stage 2: the teacher set's answers as text (data_prep pt)
    seed0/bench/{ab,c}/         data_prep bench: aid (scene), lrben (VQA), referring, region_captioning
    seed0/runs/<cond>/<arm>/    training outputs; seed0/runs/{ab,c}/teacher/
    seed0/models/<cond>/<arm>/  exports (best validation checkpoint); seed0/models/{ab,c}/teacher/
    seed0/eval/<cond>/<arm>.json, seed0/eval/{ab,c}/teacher.json, seed0/eval/<cond>/image_free.json

Every training run is ``python -m kd_pipeline.train`` on one CPU process with the configs in configs/repro and
the overrides below (the design's numbers); every model is exported with ``python -m kd_pipeline.export``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from kd_pipeline.repro import design
from kd_pipeline.repro.design import Scale
from kd_pipeline.repro.runner import ROOT, Runner, Task

CONFIGS = ROOT / "configs" / "repro"
WORLD_OF = {"paper": "ab", "limited": "ab", "ambiguous": "c"}
STUDENT_SET = {"paper": "ab_S", "limited": "ab_half", "ambiguous": "c_S"}
DOUBLE_SET = {"paper": "ab_double", "ambiguous": "c_double"}  # limited's P is paper's A (see design)
WORLD_SEED_OFFSET = {"ab": 0, "c": 10_000}
BENCH_TASKS = {"aid": "scene", "lrben": "vqa", "referring": "referring", "region_captioning": "region_captioning"}


@dataclass
class SeedPaths:
    root: Path

    def world(self, name: str) -> Path:
        return self.root / "worlds" / name

    def set_dir(self, name: str) -> Path:
        return self.root / "sets" / name

    def run(self, condition: str, arm: str) -> Path:
        return self.root / "runs" / condition / arm

    def model(self, condition: str, arm: str) -> Path:
        return self.root / "models" / condition / arm

    def eval(self, condition: str, arm: str) -> Path:
        return self.root / "eval" / condition / f"{arm}.json"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"


def eval_of(paths: SeedPaths, condition: str, arm: str, conditions: tuple[str, ...]) -> Path:
    """The evaluation file of an arm (limited's P is paper's A of the same seed when paper runs too)."""
    if condition == "limited" and arm == "P" and "paper" in conditions:
        return paths.eval("paper", "A")
    return paths.eval(condition, arm)


class SeedTasks:
    """Builds the tasks of one seed; each ``_task`` call returns the task's name for dependencies."""

    def __init__(self, runner: Runner, scale: Scale, seed: int, root: Path, conditions: tuple[str, ...]):
        self.runner, self.scale, self.seed, self.conditions = runner, scale, seed, conditions
        self.paths = SeedPaths(root / f"seed{seed}")
        self.tasks: list[Task] = []
        self.worlds = sorted({WORLD_OF[condition] for condition in conditions})

    def _task(self, name: str, action, deps: tuple[str, ...] = ()) -> str:
        full = f"seed{self.seed}.{name}"
        self.tasks.append(Task(full, action, tuple(deps), group=f"seed{self.seed}"))
        return full

    # ------------------------------------------------------------------------------------------------ data

    def data(self) -> dict[str, str]:
        scale, paths, names = self.scale, self.paths, {}
        sizes = ",".join(f"{task}={count}" for task, count in scale.bench.items())
        for world in self.worlds:
            options = ["--ambiguous"] if world == "c" else []
            names[f"world_{world}"] = self._task(f"world_{world}", lambda task, world=world, options=options:
                self.runner.python(task, "data_prep", "synth", "--out", str(paths.world(world)), "--num",
                                   str(2 * scale.records), "--seed", str(self.seed + WORLD_SEED_OFFSET[world]),
                                   "--profile", "repro", "--bench-sizes", sizes, "--pt-lines", "1", "--overwrite",
                                   *options))
        world_tasks = tuple(names[f"world_{world}"] for world in self.worlds)
        # One tokenizer for every model of the seed (distillation needs one vocabulary); both worlds say the same
        # words, so the first world's records cover the vocabulary.
        names["tokenizer"] = self._task("tokenizer", lambda task: self.runner.python(
            task, "data_prep", "tokenizer", "--instruct", str(paths.world(self.worlds[0]) / "instruct.json"),
            "--out", str(paths.tokenizer), "--vocab-size", "1000"), world_tasks)
        for set_name, (world, count) in self.labelled_sets().items():
            names[f"set_{set_name}"] = self._task(f"set_{set_name}", lambda task, s=set_name, w=world, n=count:
                                                  self._write_set(task, s, w, n), (names[f"world_{world}"],))
        for world in self.worlds:
            names[f"pt_{world}"] = self._task(f"pt_{world}", lambda task, w=world: self._write_pt(task, w),
                                              (names[f"world_{world}"],))
            names[f"bench_{world}"] = self._task(f"bench_{world}", lambda task, w=world: self._write_bench(task, w),
                                                 (names[f"world_{world}"],))
        return names

    def labelled_sets(self) -> dict[str, tuple[str, int]]:
        records = self.scale.records
        sets = {}
        for condition in self.conditions:
            world = WORLD_OF[condition]
            sets[f"{world}_S"] = (world, records)  # the teacher's set
            sets[STUDENT_SET[condition]] = (world, records // 2 if condition == "limited" else records)
            if condition in DOUBLE_SET:
                sets[DOUBLE_SET[condition]] = (world, 2 * records)
        return sets

    def _write_set(self, task: Task, set_name: str, world: str, count: int) -> None:
        records = json.loads((self.paths.world(world) / "instruct.json").read_text())[:count]
        folder = self.paths.set_dir(set_name)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "instruct.json").write_text(json.dumps(records))
        shard_samples = max(count // 16, 8)  # several shards per split even at the quick scale
        self.runner.python(task, "data_prep", "shard", "--instruct", str(folder / "instruct.json"), "--images",
                           str(self.paths.world(world) / "images"), "--out", str(folder / "shards"),
                           "--val-fraction", "0.05", "--max-shard-samples", str(shard_samples), "--workers", "1",
                           "--seed", str(self.seed), "--resume")

    def _write_pt(self, task: Task, world: str) -> None:
        """D_PT: the answers of the teacher's set as text (the only text both models were trained on)."""
        records = json.loads((self.paths.world(world) / "instruct.json").read_text())[:self.scale.records]
        answers = sorted({turn["value"].replace("\n", " ") for record in records for turn in record["conversations"]
                          if turn["from"] == "gpt"})
        text = self.paths.root / "pt" / f"{world}.txt"
        text.parent.mkdir(parents=True, exist_ok=True)
        text.write_text("".join(answer + "\n" for answer in answers))
        self.runner.python(task, "data_prep", "pt", "--text", str(text), "--out", str(self.paths.root / "pt" / world),
                           "--max-shard-samples", str(max(len(answers) // 8, 8)), "--resume")

    def _write_bench(self, task: Task, world: str) -> None:
        source = self.paths.world(world) / "bench"
        for bench_task, source_name in BENCH_TASKS.items():
            self.runner.python(task, "data_prep", "bench", "--task", bench_task, "--questions",
                               str(source / f"{source_name}.jsonl"), "--images", str(source / "images"), "--out",
                               str(self.paths.root / "bench" / world))

    # ------------------------------------------------------------------------------------------------ training

    def _train(self, task: Task, config: str, output: Path, overrides: list[str]) -> None:
        common = [f"run.output_dir={output}", f"data.tokenizer={self.paths.tokenizer}",
                  f"train.micro_batch_size={self.scale.micro_batch}"]
        self.runner.python(task, "kd_pipeline.train", "--config", str(CONFIGS / config), *common, *overrides)

    def _export(self, task: Task, run_dir: Path, model_dir: Path) -> None:
        if not (model_dir / "config.json").is_file():
            self.runner.python(task, "kd_pipeline.export", "--checkpoint", str(run_dir), "--out", str(model_dir))

    def _phase(self, steps: int, every: int, lr: float | None = None, warmup_fraction: float = 0.0) -> list[str]:
        overrides = [f"train.max_steps={steps}", f"train.eval_every={every}", f"checkpoint.every_steps={every}"]
        if lr is not None:
            overrides += [f"train.lr={lr}", f"train.warmup_steps={math.ceil(steps * warmup_fraction)}"]
        return overrides

    def teacher(self, world: str, deps: tuple[str, ...]) -> str:
        paths, scale = self.paths, self.scale
        run_dir, model_dir = paths.run(world, "teacher"), paths.model(world, "teacher")

        def action(task: Task) -> None:
            self._train(task, "teacher.yaml", run_dir, [
                f"data.shards={paths.set_dir(f'{world}_S') / 'shards'}", f"run.seed={self.seed}",
                *self._phase(scale.teacher_steps, scale.eval_every[0]), *scale.models.teacher])
            self._export(task, run_dir, model_dir)
        return self._task(f"{world}.teacher", action, deps)

    def arms(self, condition: str, data: dict[str, str], teacher_task: str) -> dict[str, str]:
        """Train + export tasks of one condition's arms; returns {arm: task name}."""
        paths, scale, seed = self.paths, self.scale, self.seed
        world = WORLD_OF[condition]
        student_shards = paths.set_dir(STUDENT_SET[condition]) / "shards"
        teacher_model = paths.model(world, "teacher")
        stage1 = self._phase(scale.stage1_steps, scale.eval_every[1], design.STAGE1_LR, design.STAGE1_WARMUP_FRACTION)
        stage1 += [f"train.min_lr_ratio={design.STAGE1_MIN_LR_RATIO}"]
        stage2 = self._phase(scale.stage2_steps, scale.eval_every[2], design.STAGE2_LR, design.STAGE2_WARMUP_FRACTION)
        stage2 += [f"train.grad_accum={scale.stage2_grad_accum}", "train.min_lr_ratio=0.0",
                   "train.adam_betas=[0.9,0.95]"]
        kd = [f"teacher.path={teacher_model}", f"kd.alpha_kd={design.KD_ALPHA}",
              f"kd.temperature={design.KD_TEMPERATURE}"]
        base = (data["tokenizer"], data[f"set_{STUDENT_SET[condition]}"])
        student_alone = self._phase(scale.student_steps, scale.eval_every[0])
        specs = {  # arm -> (config, overrides, start model arm or None, deps beyond base)
            "A": ("student.yaml", [f"data.shards={student_shards}", f"run.seed={seed}", *student_alone,
                                   *scale.models.student], ()),
            "N": ("student.yaml", [f"data.shards={student_shards}", f"run.seed={seed + design.NEGATIVE_SEED_OFFSET}",
                                   *student_alone, *scale.models.student], ()),
            "C": ("student.yaml", [f"data.shards={student_shards}", f"run.seed={seed}", *stage1,
                                   f"student.path={paths.model(condition, 'A')}"], ("A",)),
            "D": ("stage1.yaml", [f"data.shards={student_shards}", f"run.seed={seed}", *stage1, *kd,
                                  f"kd.align_weight={design.ALIGN_WEIGHT}",
                                  f"student.path={paths.model(condition, 'A')}"], ("A", "teacher")),
            "D0": ("stage1.yaml", [f"data.shards={student_shards}", f"run.seed={seed}", *stage1, *kd,
                                   "kd.align_weight=0.0", f"student.path={paths.model(condition, 'A')}"],
                   ("A", "teacher")),
            "E": ("stage2.yaml", [f"data.shards={student_shards}", f"run.seed={seed}", *stage2, *kd,
                                  f"kd.align_weight={design.ALIGN_WEIGHT}",
                                  f"data.pt_shards={paths.root / 'pt' / world}",
                                  f"run.init_from={paths.run(condition, 'D')}",
                                  f"student.path={paths.model(condition, 'A')}",
                                  f"minillm.rollouts_per_rank={scale.rollouts_per_rank}",
                                  f"minillm.max_new_tokens={scale.max_new_tokens}"], ("D", "teacher", "pt")),
            "F": ("student.yaml", [f"data.shards={student_shards}", f"run.seed={seed}", *stage2,
                                   f"student.path={paths.model(condition, 'C')}"], ("C",)),
        }
        positive_set = DOUBLE_SET.get(condition) or ("ab_S" if "paper" not in self.conditions else None)
        if positive_set:  # limited's P is paper's A when the paper condition runs too (model_of)
            specs["P"] = ("student.yaml", [f"data.shards={paths.set_dir(positive_set) / 'shards'}",
                                           f"run.seed={seed}", *student_alone, *scale.models.student], ("P_set",))
        names: dict[str, str] = {}
        for arm in ("A", "N", "P", "C", "D", "D0", "E", "F"):
            if arm not in specs:
                continue
            config, overrides, needs = specs[arm]
            deps = list(base)
            for need in needs:
                deps.append({"teacher": teacher_task, "pt": data[f"pt_{world}"],
                             "P_set": data.get(f"set_{positive_set}")}.get(need) or names[need])

            def action(task: Task, arm=arm, config=config, overrides=overrides) -> None:
                self._train(task, config, paths.run(condition, arm), overrides)
                self._export(task, paths.run(condition, arm), paths.model(condition, arm))
            names[arm] = self._task(f"{condition}.{arm}", action, tuple(deps))
        return names

    # ------------------------------------------------------------------------------------------------ evaluation

    def evaluation(self, prefix: str, world: str, models: dict[str, Path], out_dir: Path,
                   deps: tuple[str, ...], with_teacher: bool) -> str:
        """One process evaluating ``models`` ({name: folder}) into ``out_dir/<name>.json`` (repro.evaluate)."""
        paths = self.paths
        teacher = ["--teacher", str(paths.model(world, "teacher"))] if with_teacher else []
        specs = [argument for name, folder in models.items() for argument in ("--model", f"{name}={folder}")]

        def action(task: Task) -> None:
            self.runner.python(task, "kd_pipeline.repro.evaluate", "--bench", str(paths.root / "bench" / world),
                               "--out-dir", str(out_dir), *specs, *teacher,
                               "--agreement-questions", str(self.scale.agreement_questions),
                               "--max-new-tokens", str(self.scale.max_new_tokens))
        return self._task(f"{prefix}.eval", action, deps + (self._data[f"bench_{world}"],))

    def image_free(self, condition: str, data: dict) -> str:
        from kd_pipeline.eval.records import read_jsonl
        from kd_pipeline.repro.baselines import image_free_scores, question_answer_pairs

        paths, world = self.paths, WORLD_OF[condition]

        def action(task: Task) -> None:
            records = json.loads((paths.set_dir(STUDENT_SET[condition]) / "instruct.json").read_text())
            bench = {name: read_jsonl(paths.root / "bench" / world / f"{name}.jsonl") for name in BENCH_TASKS}
            scores = image_free_scores(question_answer_pairs(records), bench)
            out = paths.eval(condition, "image_free")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(scores, indent=1))
        return self._task(f"{condition}.image_free", action,
                          (data[f"set_{STUDENT_SET[condition]}"], data[f"bench_{world}"]))

    def build(self) -> list[Task]:
        data = self._data = self.data()
        teachers = {world: self.teacher(world, (data["tokenizer"], data[f"set_{world}_S"])) for world in self.worlds}
        for world, teacher_task in teachers.items():
            self.evaluation(world, world, {"teacher": self.paths.model(world, "teacher")},
                            self.paths.root / "eval" / world, (teacher_task,), with_teacher=False)
        for condition in self.conditions:
            arm_tasks = self.arms(condition, data, teachers[WORLD_OF[condition]])
            self.image_free(condition, data)
            self.evaluation(condition, WORLD_OF[condition],
                            {arm: self.paths.model(condition, arm) for arm in arm_tasks},
                            self.paths.root / "eval" / condition, tuple(arm_tasks.values()), with_teacher=True)
        return self.tasks

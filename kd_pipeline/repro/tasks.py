"""The task graph of one seed of the experiment (design 2): worlds -> data -> teachers -> arms -> evaluations.

Layout under ``--out`` (one folder per seed; world ``ab`` serves the paper and unlabelled conditions, ``c`` the
ambiguous one)::

    seed5/worlds/{ab,c}/          data_prep synth --profile repro (2R records; c with --ambiguous)
    seed5/tokenizer/              data_prep tokenizer on the first world's records
    seed5/sets/<set>/             instruct.json + shards/ of each training set:
                                  ab_S, c_S          the first R records: the teacher's set (and paper's student's)
                                  ab_double, c_double  all 2R records: Pc of paper / ambiguous
                                  ab_L<share>        the first share x R records: the unlabelled student's labels
                                  ab_S_prompts, c_S_prompts   S without its answers (--prompts-only): stage 2's prompts
                                  ab_G<share>        L + the teacher's greedy answers to the rest of S (arm G)
    seed5/pt/<set>/               D_PT for stage 2: the answers of the student's labelled set as text (data_prep pt)
    seed5/bench/{ab,c}/           data_prep bench: aid (scene), lrben (VQA), region_captioning
    seed5/runs/<cond>/<arm>/      training outputs; seed5/runs/{ab,c}/teacher/
    seed5/models/<cond>/<arm>/    exports (best validation checkpoint); seed5/models/{ab,c}/teacher/
    seed5/eval/<cond>/<arm>.json, seed5/eval/{ab,c}/teacher.json, seed5/eval/<cond>/image_free.json

A ``variant`` (the pilot's) puts runs, models and evaluations under ``<variant>/`` and shares worlds, sets, the
tokenizer, benchmarks and teachers. Every training run is ``python -m kd_pipeline.train`` on one CPU process with
the configs in configs/repro and the overrides below (the design's numbers); every model is exported with
``python -m kd_pipeline.export``. Arms are evaluated in three groups per condition as soon as each group is trained
(the students alone, the other stage-1-length arms, the stage-2 arms), so evaluation overlaps training.
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
WORLD_OF = {"paper": "ab", "unlabelled": "ab", "ambiguous": "c"}
BENCH_TASKS = {"aid": "scene", "lrben": "vqa", "region_captioning": "region_captioning"}
START_OF = {"C": "A", "D": "A", "D_al": "A", "Pc": "A", "E": "D", "E0": "D", "E_ss": "D", "F": "C", "G": "C"}
EVAL_GROUPS = (("A", "N", "C", "Pc"), ("D", "D_al", "F", "G"), ("E", "E0", "E_ss"))
SHARD_VAL_MIN = 40  # validation records of a small set (the labelled share): best-checkpoint choice needs some


def with_dependencies(arms: tuple[str, ...]) -> tuple[str, ...]:
    """``arms`` and every arm they start from, in design order."""
    needed = set(arms)
    for arm in arms:
        while arm in START_OF:
            arm = START_OF[arm]
            needed.add(arm)
    return tuple(arm for arm in design.ARMS if arm in needed)


def share_name(share: float) -> str:
    return f"{share:g}"


@dataclass
class SeedPaths:
    root: Path
    variant: str = ""

    def world(self, name: str) -> Path:
        return self.root / "worlds" / name

    def set_dir(self, name: str) -> Path:
        return self.root / "sets" / name

    def pt(self, set_name: str) -> Path:
        return self.root / "pt" / set_name

    def _varied(self, kind: str) -> Path:
        return self.root / kind / self.variant if self.variant else self.root / kind

    def run(self, condition: str, arm: str) -> Path:
        return self._varied("runs") / condition / arm

    def model(self, condition: str, arm: str) -> Path:
        return self._varied("models") / condition / arm

    def eval(self, condition: str, arm: str) -> Path:
        return self._varied("eval") / condition / f"{arm}.json"

    def teacher_run(self, world: str) -> Path:
        return self.root / "runs" / world / "teacher"

    def teacher_model(self, world: str) -> Path:
        return self.root / "models" / world / "teacher"

    def teacher_eval(self, world: str) -> Path:
        return self.root / "eval" / world / "teacher.json"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"


class SeedTasks:
    """Builds the tasks of one seed; each ``_task`` call returns the task's name for dependencies."""

    def __init__(self, runner: Runner, scale: Scale, seed: int, root: Path, conditions: tuple[str, ...],
                 arms: tuple[str, ...] = design.ARMS, variant: str = ""):
        self.runner, self.scale, self.seed, self.conditions = runner, scale, seed, conditions
        self.paths = SeedPaths(root / f"seed{seed}", variant)
        self.variant = variant
        self.requested = with_dependencies(arms)
        self.tasks: list[Task] = []
        self.worlds = sorted({WORLD_OF[condition] for condition in conditions})
        self.share = share_name(scale.labelled_share)

    def _task(self, name: str, action, deps: tuple[str, ...] = (), varied: bool = False) -> str:
        full = f"seed{self.seed}.{self.variant + '.' if varied and self.variant else ''}{name}"
        self.tasks.append(Task(full, action, tuple(deps), group=f"seed{self.seed}"))
        return full

    # ------------------------------------------------------------------------------------------------ sets

    def student_set(self, condition: str) -> str:
        """The student's labelled set: S, or the labelled share L in `unlabelled`."""
        world = WORLD_OF[condition]
        return f"{world}_L{self.share}" if condition == "unlabelled" else f"{world}_S"

    def labelled_sets(self) -> dict[str, tuple[str, int, int]]:
        """{set: (world, first record, record count)} of every labelled set the conditions read."""
        records, sets = self.scale.records, {}
        for condition in self.conditions:
            world = WORLD_OF[condition]
            sets[f"{world}_S"] = (world, 0, records)  # the teacher's set
            sets[self.student_set(condition)] = (world, 0, records if condition != "unlabelled" else
                                                 max(1, round(records * self.scale.labelled_share)))
            if condition != "unlabelled":
                sets[f"{world}_double"] = (world, 0, 2 * records)  # Pc's twice the data
        return sets

    # ------------------------------------------------------------------------------------------------ data

    def data(self) -> dict[str, str]:
        scale, paths, names = self.scale, self.paths, {}
        sizes = ",".join(f"{task}={count}" for task, count in scale.bench.items())
        for world in self.worlds:
            options = ["--ambiguous"] if world == "c" else []
            names[f"world_{world}"] = self._task(f"world_{world}", lambda task, world=world, options=options:
                self.runner.python(task, "data_prep", "synth", "--out", str(paths.world(world)), "--num",
                                   str(2 * scale.records), "--seed", str(self.seed + design.WORLD_SEED_OFFSET[world]),
                                   "--profile", "repro", "--bench-sizes", sizes, "--pt-lines", "1", "--overwrite",
                                   *options))
        world_tasks = tuple(names[f"world_{world}"] for world in self.worlds)
        # One tokenizer for every model of the seed (distillation needs one vocabulary); both worlds say the same
        # words, so the first world's records cover the vocabulary.
        names["tokenizer"] = self._task("tokenizer", lambda task: self.runner.python(
            task, "data_prep", "tokenizer", "--instruct", str(paths.world(self.worlds[0]) / "instruct.json"),
            "--out", str(paths.tokenizer), "--vocab-size", "1000"), world_tasks)
        for set_name, (world, first, count) in self.labelled_sets().items():
            names[f"set_{set_name}"] = self._task(f"set_{set_name}", lambda task, s=set_name, w=world, a=first, n=count:
                                                  self._write_set(task, s, w, a, n), (names[f"world_{world}"],))
        for condition in self.conditions:
            student_set, world = self.student_set(condition), WORLD_OF[condition]
            if f"pt_{student_set}" not in names:
                names[f"pt_{student_set}"] = self._task(f"pt_{student_set}", lambda task, s=student_set:
                                                        self._write_pt(task, s), (names[f"set_{student_set}"],))
            if f"prompts_{world}" not in names:
                names[f"prompts_{world}"] = self._task(f"set_{world}_S_prompts", lambda task, w=world:
                                                       self._write_prompts(task, w), (names[f"set_{world}_S"],))
        for world in self.worlds:
            names[f"bench_{world}"] = self._task(f"bench_{world}", lambda task, w=world: self._write_bench(task, w),
                                                 (names[f"world_{world}"],))
        return names

    def _shard(self, task: Task, folder: Path, images: Path, count: int, *extra: str) -> None:
        val_fraction = max(0.05, min(0.2, SHARD_VAL_MIN / max(count, 1)))
        shard_samples = max(count // 16, 8)  # several shards per split even at the quick scale
        self.runner.python(task, "data_prep", "shard", "--instruct", str(folder / "instruct.json"), "--images",
                           str(images), "--out", str(folder / "shards"), "--val-fraction", f"{val_fraction:.4f}",
                           "--max-shard-samples", str(shard_samples), "--workers", "1", "--seed", str(self.seed),
                           "--resume", *extra)

    def _records(self, world: str, first: int, count: int) -> list[dict]:
        return json.loads((self.paths.world(world) / "instruct.json").read_text())[first:first + count]

    def _write_set(self, task: Task, set_name: str, world: str, first: int, count: int) -> None:
        folder = self.paths.set_dir(set_name)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "instruct.json").write_text(json.dumps(self._records(world, first, count)))
        self._shard(task, folder, self.paths.world(world) / "images", count)

    def _write_prompts(self, task: Task, world: str) -> None:
        """S without its answers: the file holds the questions only, so stage 2 cannot see an answer it lacks."""
        records = [{**record, "conversations": record["conversations"][:1]}
                   for record in self._records(world, 0, self.scale.records)]
        folder = self.paths.set_dir(f"{world}_S_prompts")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "instruct.json").write_text(json.dumps(records))
        self._shard(task, folder, self.paths.world(world) / "images", len(records), "--prompts-only")

    def _write_pt(self, task: Task, set_name: str) -> None:
        """D_PT: the answers of the student's labelled set as text (the only text the student may see)."""
        records = json.loads((self.paths.set_dir(set_name) / "instruct.json").read_text())
        answers = sorted({turn["value"].replace("\n", " ") for record in records for turn in record["conversations"]
                          if turn["from"] == "gpt"})
        text = self.paths.root / "pt" / f"{set_name}.txt"
        text.parent.mkdir(parents=True, exist_ok=True)
        text.write_text("".join(answer + "\n" for answer in answers))
        self.runner.python(task, "data_prep", "pt", "--text", str(text), "--out", str(self.paths.pt(set_name)),
                           "--max-shard-samples", str(max(len(answers) // 8, 8)), "--resume")

    def _write_bench(self, task: Task, world: str) -> None:
        source = self.paths.world(world) / "bench"
        for bench_task, source_name in BENCH_TASKS.items():
            self.runner.python(task, "data_prep", "bench", "--task", bench_task, "--questions",
                               str(source / f"{source_name}.jsonl"), "--images", str(source / "images"), "--out",
                               str(self.paths.root / "bench" / world))

    def _write_pseudo_labelled(self, task: Task, world: str) -> None:
        """Arm G's set: L with its answers + the teacher's greedy answers to the prompts of S it has no answers for
        (``eval label``: sequence-level KD)."""
        labelled = json.loads((self.paths.set_dir(f"{world}_L{self.share}") / "instruct.json").read_text())
        unlabelled = [{**record, "conversations": record["conversations"][:1]}
                      for record in self._records(world, len(labelled), self.scale.records - len(labelled))]
        folder = self.paths.set_dir(f"{world}_G{self.share}")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "prompts.json").write_text(json.dumps(unlabelled))
        self.runner.python(task, "kd_pipeline.eval", "label", "--model", str(self.paths.teacher_model(world)),
                           "--instruct", str(folder / "prompts.json"),
                           "--images", str(self.paths.world(world) / "images"),
                           "--out", str(folder / "pseudo.json"), "--max-new-tokens", str(self.scale.max_new_tokens),
                           "--batch-size", "64")
        pseudo = json.loads((folder / "pseudo.json").read_text())
        (folder / "instruct.json").write_text(json.dumps(labelled + pseudo))
        self._shard(task, folder, self.paths.world(world) / "images", len(labelled) + len(pseudo))

    # ------------------------------------------------------------------------------------------------ training

    def _train(self, task: Task, config: str, output: Path, overrides: list[str]) -> None:
        common = [f"run.output_dir={output}", f"data.tokenizer={self.paths.tokenizer}",
                  f"train.micro_batch_size={self.scale.micro_batch}"]
        self.runner.python(task, "kd_pipeline.train", "--config", str(CONFIGS / config), *common, *overrides)

    def _export(self, task: Task, run_dir: Path, model_dir: Path) -> None:
        if not (model_dir / "config.json").is_file():
            self.runner.python(task, "kd_pipeline.export", "--checkpoint", str(run_dir), "--out", str(model_dir))

    @staticmethod
    def _phase(steps: int, every: int, lr: float | None = None, warmup_fraction: float = 0.0) -> list[str]:
        overrides = [f"train.max_steps={steps}", f"train.eval_every={every}", f"checkpoint.every_steps={every}"]
        if lr is not None:
            overrides += [f"train.lr={lr}", f"train.warmup_steps={math.ceil(steps * warmup_fraction)}"]
        return overrides

    def stage2_schedule(self) -> list[str]:
        """E's learning-rate schedule and batch, shared by E, E0, E_ss and the cross-entropy controls F and G."""
        scale = self.scale
        return [*self._phase(scale.stage2_steps, scale.eval_every[2], scale.stage2_lr, design.STAGE2_WARMUP_FRACTION),
                f"train.grad_accum={scale.stage2_grad_accum}", "train.min_lr_ratio=0.0", "train.adam_betas=[0.9,0.95]"]

    def stage2_overrides(self, condition: str) -> list[str]:
        """Everything of a stage-2 run but its start (run.init_from) and output: prompts, D_PT, teacher, sampling."""
        paths, world = self.paths, WORLD_OF[condition]
        return [f"data.shards={paths.set_dir(f'{world}_S_prompts') / 'shards'}",
                f"data.pt_shards={paths.pt(self.student_set(condition))}", f"run.seed={self.seed}",
                *self.stage2_schedule(), f"teacher.path={paths.teacher_model(world)}",
                f"minillm.align_weight={design.STAGE2_ALIGN_WEIGHT}",
                f"minillm.rollouts_per_rank={self.scale.rollouts_per_rank}",
                f"minillm.max_new_tokens={self.scale.max_new_tokens}"]

    def teacher(self, world: str, deps: tuple[str, ...]) -> str:
        paths, scale = self.paths, self.scale
        run_dir, model_dir = paths.teacher_run(world), paths.teacher_model(world)

        def action(task: Task) -> None:
            self._train(task, "teacher.yaml", run_dir, [
                f"data.shards={paths.set_dir(f'{world}_S') / 'shards'}", f"run.seed={self.seed}",
                *self._phase(scale.teacher_steps, scale.eval_every[0]), *scale.models.teacher])
            self._export(task, run_dir, model_dir)
        return self._task(f"{world}.teacher", action, deps)

    def arm_specs(self, condition: str) -> dict[str, tuple[str, list[str], tuple[str, ...]]]:
        """{arm: (config, overrides, needs beyond the start arm: "teacher", "pseudo" or a data task key)}."""
        paths, scale, seed = self.paths, self.scale, self.seed
        world, student_set = WORLD_OF[condition], self.student_set(condition)
        labelled = f"data.shards={paths.set_dir(student_set) / 'shards'}"
        double = f"{world}_S" if condition == "unlabelled" else f"{world}_double"
        stage1 = [*self._phase(scale.stage1_steps, scale.eval_every[1], design.STAGE1_LR,
                               design.STAGE1_WARMUP_FRACTION), f"train.min_lr_ratio={design.STAGE1_MIN_LR_RATIO}",
                  f"run.seed={seed}"]
        kd = [f"teacher.path={paths.teacher_model(world)}", f"kd.alpha_kd={design.KD_ALPHA}",
              f"kd.temperature={design.KD_TEMPERATURE}"]
        alone = [labelled, *self._phase(scale.student_steps, scale.eval_every[0]), *scale.models.student]
        start = {arm: f"student.path={paths.model(condition, START_OF[arm])}" for arm in START_OF}
        stage2 = [*self.stage2_overrides(condition), start["E"], f"run.init_from={paths.run(condition, 'D')}"]
        needs_teacher = ("teacher",)
        return {
            "A": ("student.yaml", [*alone, f"run.seed={seed}"], ()),
            "N": ("student.yaml", [*alone, f"run.seed={seed + design.NEGATIVE_SEED_OFFSET}"], ()),
            "C": ("student.yaml", [labelled, *stage1, start["C"]], ()),
            "Pc": ("student.yaml", [f"data.shards={paths.set_dir(double) / 'shards'}", *stage1, start["Pc"]],
                   (f"set_{double}",)),
            "D": ("stage1.yaml", [labelled, *stage1, *kd, "kd.align_weight=0.0", start["D"]], needs_teacher),
            "D_al": ("stage1.yaml", [labelled, *stage1, *kd, f"kd.align_weight={design.STAGE1_ALIGN_WEIGHT_ABLATION}",
                                     start["D_al"]], needs_teacher),
            "E": ("stage2.yaml", stage2, (*needs_teacher, f"pt_{student_set}", f"prompts_{world}")),
            "E0": ("stage2.yaml", [*stage2, "minillm.align_weight=0.0"],
                   (*needs_teacher, f"pt_{student_set}", f"prompts_{world}")),
            "E_ss": ("stage2.yaml", [*stage2, "minillm.long_term_weight=0.0"],
                     (*needs_teacher, f"pt_{student_set}", f"prompts_{world}")),
            "F": ("student.yaml", [labelled, f"run.seed={seed}", *self.stage2_schedule(), start["F"]], ()),
            "G": ("student.yaml", [f"data.shards={paths.set_dir(f'{world}_G{self.share}') / 'shards'}",
                                   f"run.seed={seed}", *self.stage2_schedule(), start["G"]], ("pseudo",)),
        }

    def arms(self, condition: str, data: dict[str, str], teacher_task: str) -> dict[str, str]:
        """Train + export tasks of one condition's arms; returns {arm: task name}."""
        paths, world = self.paths, WORLD_OF[condition]
        specs = self.arm_specs(condition)
        wanted = [arm for arm in design.condition_arms(condition) if arm in self.requested]
        names: dict[str, str] = {}
        for arm in (arm for arm in design.ARMS if arm in wanted):
            config, overrides, needs = specs[arm]
            deps = [data["tokenizer"], data[f"set_{self.student_set(condition)}"]]
            if arm in START_OF:
                deps.append(names[START_OF[arm]])
            for need in needs:
                if need == "teacher":
                    deps.append(teacher_task)
                elif need == "pseudo":
                    deps.append(self.pseudo_task(world, data, teacher_task))
                else:
                    deps.append(data[need])

            def action(task: Task, arm=arm, config=config, overrides=overrides) -> None:
                self._train(task, config, paths.run(condition, arm), overrides)
                self._export(task, paths.run(condition, arm), paths.model(condition, arm))
            names[arm] = self._task(f"{condition}.{arm}", action, tuple(deps), varied=True)
        return names

    def pseudo_task(self, world: str, data: dict[str, str], teacher_task: str) -> str:
        key = f"pseudo_{world}"
        if key not in data:
            data[key] = self._task(f"set_{world}_G{self.share}", lambda task: self._write_pseudo_labelled(task, world),
                                   (teacher_task, data[f"set_{world}_L{self.share}"]))
        return data[key]

    # ------------------------------------------------------------------------------------------------ evaluation

    def evaluation(self, name: str, world: str, models: dict[str, Path], out_dir: Path, deps: tuple[str, ...],
                   with_teacher: bool, varied: bool = True) -> str:
        """One process evaluating ``models`` ({name: folder}) into ``out_dir/<name>.json`` (repro.evaluate)."""
        paths = self.paths
        teacher = ["--teacher", str(paths.teacher_model(world))] if with_teacher else []
        specs = [argument for arm, folder in models.items() for argument in ("--model", f"{arm}={folder}")]

        def action(task: Task) -> None:
            self.runner.python(task, "kd_pipeline.repro.evaluate", "--bench", str(paths.root / "bench" / world),
                               "--out-dir", str(out_dir), *specs, *teacher,
                               "--agreement-questions", str(self.scale.agreement_questions),
                               "--max-new-tokens", str(self.scale.max_new_tokens))
        return self._task(name, action, deps + (self._data[f"bench_{world}"],), varied=varied)

    def image_free(self, condition: str, data: dict) -> str:
        from kd_pipeline.eval.records import read_jsonl
        from kd_pipeline.repro.baselines import image_free_scores, question_answer_pairs

        paths, world, student_set = self.paths, WORLD_OF[condition], self.student_set(condition)

        def action(task: Task) -> None:
            records = json.loads((paths.set_dir(student_set) / "instruct.json").read_text())
            bench = {name: read_jsonl(paths.root / "bench" / world / f"{name}.jsonl") for name in BENCH_TASKS}
            scores = image_free_scores(question_answer_pairs(records), bench)
            out = paths.eval(condition, "image_free")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(scores, indent=1))
        return self._task(f"{condition}.image_free", action, (data[f"set_{student_set}"], data[f"bench_{world}"]),
                          varied=True)

    def build(self) -> list[Task]:
        data = self._data = self.data()
        teachers = {world: self.teacher(world, (data["tokenizer"], data[f"set_{world}_S"])) for world in self.worlds}
        for world, teacher_task in teachers.items():
            self.evaluation(f"{world}.teacher_eval", world, {"teacher": self.paths.teacher_model(world)},
                            self.paths.teacher_eval(world).parent, (teacher_task,), with_teacher=False, varied=False)
        for condition in self.conditions:
            teacher_task = teachers[WORLD_OF[condition]]
            arm_tasks = self.arms(condition, data, teacher_task)
            self.image_free(condition, data)
            for index, group in enumerate(EVAL_GROUPS, start=1):
                members = [arm for arm in group if arm in arm_tasks]
                if members:
                    self.evaluation(f"{condition}.eval{index}", WORLD_OF[condition],
                                    {arm: self.paths.model(condition, arm) for arm in members},
                                    self.paths.eval(condition, members[0]).parent,
                                    (teacher_task, *(arm_tasks[arm] for arm in members)), with_teacher=True)
        return self.tasks

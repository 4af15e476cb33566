"""Everything a training run needs that can be checked without building a model, checked before any model is built.

``train.py`` calls ``check_run(config)`` right after loading the config, before the process group, DeepSpeed and
the engines exist: a typo in ``data.shards`` must cost the seconds of importing torch, not a 13B + 7B load. Every
rank runs it (the checks only read small files, and a rank on a node that lacks a file must not be the one that
hangs while the others wait for it).

Checks, cheapest first; the first problem raises a ``UserError`` subclass whose message names the key and the fix
(train.py turns it into one line on stderr and exit 2). What needs only the config itself (stage-2 batch
arithmetic, choices, ranges) was checked when ``load_config`` built the frozen ``Config``.

1. instruction shards (``data.shards``): the manifest and the train split; the val split too unless
   ``train.eval_every=0`` (no validation at all); stage 2 also the pre-training shards ``data.pt_shards`` (unless
   ``minillm.pt_weight=0``);
2. ``deepspeed.config`` exists and is JSON (the rest of it is resolved against the runtime when engines are built);
3. model folders: ``student.path`` (and ``teacher.path`` unless ``run.stage=sft``) hold a ``config.json``;
4. the tokenizer (``data.tokenizer``, else ``student.path``) loads with LLaMA's special ids; for distillation, a
   teacher folder that carries its own tokenizer has the same vocabulary and a student folder has no padding rows
   beyond it (KD compares distributions id by id; a padded teacher is fine, its extra rows are dropped);
5. stage 2: ``run.init_from`` is a complete checkpoint, unless the run resumes from a checkpoint;
6. an explicit ``checkpoint.resume`` path exists (its contents are verified by rank 0 when the run resumes);
7. the loader states of the checkpoint to resume fit this run's shards and ``run.seed``.
"""

from __future__ import annotations

import json
from pathlib import Path

from kd_pipeline.config import Config, ConfigError


def check_run(config: Config) -> None:
    """Run every check of the module docstring, in order; raises the first problem found."""
    check_shards(config)
    check_deepspeed_json(config)
    check_model_folders(config)
    check_tokenizers(config)
    if config.run.stage == "minillm":
        check_init_from(config)
    check_resume_path(config)
    check_resume_loader_states(config)


def check_deepspeed_json(config: Config) -> None:
    from kd_pipeline.engine.ds_config import load_ds_json

    load_ds_json(config.deepspeed.config)


def check_model_folders(config: Config) -> None:
    from kd_pipeline.models import ModelError

    roles = ("student",) if config.run.stage == "sft" else ("student", "teacher")
    for role in roles:
        path = getattr(config, role).path
        if path and not (Path(path) / "config.json").is_file():
            raise ModelError(f"{role}.path={path} has no config.json: give a transformers LLaVA folder (python -m "
                             f"kd_pipeline.convert geochat-to-hf makes one from a GeoChat checkpoint)")


def check_tokenizers(config: Config) -> None:
    from kd_pipeline.tokenizer import TokenizerError, load_tokenizer, tokenizer_folder

    folder = tokenizer_folder(config)
    key = "data.tokenizer" if config.data.tokenizer else "student.path"
    try:
        vocabulary = load_tokenizer(folder).get_vocab()
    except TokenizerError as error:
        raise TokenizerError(f"{key}: {error}") from error
    except (OSError, ValueError) as error:  # transformers' own complaints about a damaged folder
        raise TokenizerError(f"{key}={folder} cannot be loaded as a tokenizer ({type(error).__name__}: {error}); "
                             f"point it to a LLaMA tokenizer folder") from error
    if config.run.stage == "sft":
        return
    teacher_path = config.teacher.path
    if teacher_path and (Path(teacher_path) / "tokenizer_config.json").is_file():
        if load_tokenizer(teacher_path).get_vocab() != vocabulary:
            raise TokenizerError(f"the tokenizer in teacher.path={teacher_path} differs from the student's ({key}="
                                 f"{folder}): KD needs one shared vocabulary")
    if config.student.path:
        rows = _embedding_rows(Path(config.student.path) / "config.json")
        if rows > len(vocabulary):
            raise TokenizerError(f"student.path={config.student.path} has {rows} embedding rows for the tokenizer's "
                                 f"{len(vocabulary)} tokens (a padded vocabulary): distillation compares student and "
                                 f"teacher distributions over the tokenizer's tokens, so the student must not carry "
                                 f"padding rows; start from an unpadded checkpoint")


def _embedding_rows(config_file: Path) -> int:
    """``text_config.vocab_size`` of a transformers LLaVA ``config.json`` (0 when it does not say)."""
    from kd_pipeline.models import ModelError

    try:
        settings = json.loads(config_file.read_text())
    except (OSError, ValueError) as error:
        raise ModelError(f"{config_file} is not readable JSON ({error}): give a transformers LLaVA folder") from error
    text_config = settings.get("text_config") if isinstance(settings, dict) else None
    return int(text_config.get("vocab_size", 0)) if isinstance(text_config, dict) else 0


def check_shards(config: Config) -> None:
    from kd_pipeline.data.manifest import PROMPT_KINDS, ManifestError, read_split

    prompt_kinds = PROMPT_KINDS if config.run.stage == "minillm" else None  # stage 2 reads prompts only

    def check_split(key: str, folder: str, split: str, hint: str = "") -> None:
        try:
            read_split(folder, split, prompt_kinds if split != "pt" else None)
        except ManifestError as error:
            raise ManifestError(f"{key}={folder}: {error}{hint}") from error

    check_split("data.shards", config.data.shards, "train")
    if config.train.eval_every:
        check_split("data.shards", config.data.shards, "val",
                    hint=f"; validation (train.eval_every={config.train.eval_every}) reads the val split: re-shard "
                         f"with `data_prep shard --val-fraction` > 0, or set train.eval_every=0 to train without it")
    if config.run.stage == "minillm" and config.minillm.pt_weight > 0:  # pt_weight 0 reads no D_PT batch
        if not config.data.pt_shards:
            raise ConfigError("run.stage=minillm needs data.pt_shards (a `data_prep pt` folder): the pre-training "
                              "loss is part of the method; set minillm.pt_weight=0 to run without it")
        check_split("data.pt_shards", config.data.pt_shards, "pt")


def _resume_candidate(config: Config) -> Path | None:
    """The checkpoint this run will most likely continue from, found cheaply (markers, no checksums): an explicit
    ``checkpoint.resume``, else the ``latest`` (or newest complete) one in ``run.output_dir``. Rank 0 makes the
    binding choice, with checksums and fallbacks, once the run starts (``recipes.common.prepare_resume``)."""
    from kd_pipeline.checkpoint import complete_tags

    if config.checkpoint.resume == "none":
        return None
    if config.checkpoint.resume != "auto":
        return Path(config.checkpoint.resume)
    checkpoint_dir = Path(config.run.output_dir) / "checkpoints"
    tags = complete_tags(checkpoint_dir)
    latest = checkpoint_dir / "latest"
    if latest.is_file() and latest.read_text().strip() in tags:
        return checkpoint_dir / latest.read_text().strip()
    return checkpoint_dir / tags[0] if tags else None


def check_init_from(config: Config) -> None:
    """Stage 2 starts from ``run.init_from`` only on a fresh start; a resumed run does not read it."""
    from kd_pipeline.checkpoint import resolve_init_from

    if config.run.init_from and _resume_candidate(config) is None:
        resolve_init_from(config.run.init_from)


def check_resume_loader_states(config: Config) -> None:
    """The loader states saved in the checkpoint to resume must fit this run's shards and seed: a resume against
    other data or another seed cannot replay the stream (``data.state``). Only that mismatch is refused here; a
    damaged state file is left to the resume itself, which falls back to an earlier checkpoint."""
    from kd_pipeline.data.manifest import PROMPT_KINDS, read_split
    from kd_pipeline.data.state import LoaderStateError, load_loader_state

    folder = _resume_candidate(config)
    if folder is None or not folder.is_dir():
        return
    if config.run.stage == "minillm":
        loaders = {"prompt": (config.data.shards, "train")}
        if config.minillm.pt_weight > 0:
            loaders["pt"] = (config.data.pt_shards, "pt")
    else:
        loaders = {"train": (config.data.shards, "train")}
    for name, (shards, split) in loaders.items():
        try:
            state = load_loader_state(folder, name)
        except LoaderStateError:
            continue
        if state is None:
            continue
        try:
            kinds = PROMPT_KINDS if name == "prompt" else None
            state.check_compatible(loader=name, split=split, fingerprint=read_split(shards, split, kinds).fingerprint,
                                   seed=config.run.seed)
        except LoaderStateError as error:
            raise LoaderStateError(f"resuming {folder} ({name} loader): {error}") from error


def check_resume_path(config: Config) -> None:
    from kd_pipeline.checkpoint import CheckpointError

    resume = config.checkpoint.resume
    if resume not in ("auto", "none") and not Path(resume).is_dir():
        raise CheckpointError(f"checkpoint.resume={resume} does not exist: give a checkpoint folder, or auto / none")

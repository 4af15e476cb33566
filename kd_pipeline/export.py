"""Export a training checkpoint as a transformers LLaVA folder (or a GeoChat folder) that loads offline.

Runbook::

    # one checkpoint folder
    python -m kd_pipeline.export --checkpoint runs/kd/checkpoints/step_00000050 --out export/student_hf
    # a run output folder: its `best` checkpoint, else its `latest` (the log says which)
    python -m kd_pipeline.export --checkpoint runs/kd --out export/student_hf --merge-lora
    # GeoChat's own layout (through kd_pipeline.convert.hf_to_geochat; keep "geochat" in the folder name)
    python -m kd_pipeline.export --checkpoint runs/kd --out export/geochat-7b-distilled --format geochat

Then ``LlavaForConditionalGeneration.from_pretrained("export/student_hf")`` gives the trained student.

Steps, in order: resolve the checkpoint folder -> verify it against its ``COMPLETE.json`` (sizes and sha256; a
folder without the marker is refused) -> read its ``config.yaml`` -> consolidate the ZeRO shards with DeepSpeed's
own ``get_fp32_state_dict_from_zero_checkpoint`` (CPU, no process group; this yields the ``StudentModule`` state:
``llava.*`` and ``feature_map.*``) -> rebuild the student on CPU in float32 from that config with
``create_model`` (no DeepSpeed) -> copy the ``llava.*`` tensors in, strictly (every key, every shape) -> merge LoRA
when asked (in float32, then cast) -> write.

``--format hf`` output (written to ``OUT.partial`` and renamed when complete), a complete transformers folder::

    processor = AutoProcessor.from_pretrained("export/student_hf")
    model = LlavaForConditionalGeneration.from_pretrained("export/student_hf")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Classify the image."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    answer_ids = model.generate(**processor(images=image.convert("RGB"), text=prompt, return_tensors="pt"))

    config.json                            the LLaVA model config
    generation_config.json                 how ``eval run`` decodes: greedy, one beam, stop at EOS, pad 0, 256 new
                                           tokens (``eval.generate.greedy_generation_config``)
    model.safetensors (or shards + index)  the weights in ``--dtype``
    adapter_config.json                    LoRA students without --merge-lora only: peft's adapter files next to
    adapter_model.safetensors              the base weights (base = every trained non-LoRA weight, projector
                                           included). transformers' from_pretrained loads such a folder as base +
                                           embedded adapter (peft must be installed); merging gives the same logits.
    processor_config.json                  ``LlavaProcessor``: patch size and feature strategy of the tower, so
                                           ``<image>`` expands to the model's (image_size / patch)^2 image tokens
    preprocessor_config.json               ``LlavaImageProcessor`` doing GeoChat's preprocessing: pad to a square
                                           filled with the CLIP mean, bicubic resize to the tower's size, no crop,
                                           CLIP mean/std (``kd_pipeline.data.images.image_processor``: its pixels
                                           equal the training loader's)
    chat_template.jinja                    GeoChat's ``llava_v1`` prompt (evaluation and demo); ``chat_templates/``
    chat_templates/{llava_v1,vicuna_v1}    holds both by name (``vicuna_v1``: the training template), e.g.
                                           ``processor.apply_chat_template(messages, chat_template="vicuna_v1")``
    tokenizer files + tokenizer.model      ``kd_pipeline.tokenizer``: legacy LLaMA tokenization, as in training
    feature_map.safetensors                P (student hidden -> teacher hidden) for continuing distillation, keys
                                           without the ``feature_map.`` prefix; absent when P has no weights
    run_config.yaml                        the checkpoint's resolved run config
    export.json                            provenance: source checkpoint, step, dtype, LoRA handling, format

With torchvision installed, load the processor with ``AutoProcessor.from_pretrained(folder, backend="pil")``:
transformers then prefers its torchvision backend, whose bicubic resize is not PIL's (see ``data/images.py``).

``--format geochat`` writes GeoChat's layout (LoRA always merged: GeoChat's adapter form is not produced) plus
``feature_map.safetensors``, ``run_config.yaml`` and ``export.json``. Of the above, GeoChat's layout has equivalents
for the generation config (``generation_config.json``, read by its ``generate``) and the chat template (in
``tokenizer_config.json``, for transformers >= 4.34; GeoChat's own code picks its template by ``--conv-mode``); its
preprocessing is stated by ``config.json`` itself (``image_aspect_ratio: pad`` with the CLIP processor of
``mm_vision_tower``), so no processor file is written.

dtype: ``auto`` writes what the engine computed with (bf16 when the checkpoint's DeepSpeed config enabled it, else
fp16 / fp32). The engine's 16-bit parameters are casts of the fp32 masters, so these are the weights it ran with
(the tests check logit equality in fp32 on CPU; a merged LoRA in 16 bit differs from the unmerged forward by rounding).

Resources: peak CPU memory is about the float32 student (4 B/param, 28 GB for 7B) plus pages of DeepSpeed's
memory-mapped shards. A ``student.path`` config is rebuilt through ``create_model``, which first loads that folder
(it must exist where the export runs; its weights are then replaced by the checkpoint's).

Exit codes: 0 written; 2 bad input (one line on stderr naming the path or key).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from kd_pipeline.checkpoint import MARKER, TAG_PATTERN, CheckpointError, module_state, verify_checkpoint
from kd_pipeline.config import Config, load_config
from kd_pipeline.errors import UserError, user_errors_exit

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODULE_PREFIXES = ("llava.", "feature_map.")
"""The ``StudentModule`` attributes whose tensors a checkpoint holds (see ``kd_pipeline.engine.modules``)."""


class ExportError(UserError, ValueError):
    """A checkpoint that cannot be exported, worded with the path or key and what to do."""


# ----------------------------------------------------------------------------------------------------- source


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder as given; a run output folder (or its ``checkpoints`` folder) -> its ``best``, else its
    ``latest`` checkpoint."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"--checkpoint {path} does not exist")
    if (path / MARKER).is_file() or TAG_PATTERN.match(path.name) or any(path.glob("*model_states.pt")):
        return path
    checkpoints = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    for pointer in ("best", "latest"):
        pointer_file = checkpoints / pointer
        if pointer_file.is_file():
            tag = pointer_file.read_text().strip()
            folder = checkpoints / tag
            if not folder.is_dir():
                raise ExportError(f"{pointer_file} names {tag!r} but {folder} does not exist: pass a checkpoint "
                                  f"folder from {checkpoints} explicitly")
            log.info("using the %s checkpoint of %s: %s", pointer, path, folder)
            return folder
    raise ExportError(f"{path} is neither a checkpoint folder nor a run folder with checkpoints/best or "
                      f"checkpoints/latest")


def verified_folder(path: str | Path, *, check_hashes: bool = True) -> Path:
    """``resolve_checkpoint`` plus the completeness check; an unfinished or damaged checkpoint is refused."""
    folder = resolve_checkpoint(path)
    problem = verify_checkpoint(folder, deep=check_hashes)
    if problem is not None:
        raise ExportError(f"checkpoint {folder} is incomplete or damaged: {problem}; export a complete one "
                          f"(see {folder.parent / 'latest'})")
    return folder


def checkpoint_config(folder: Path) -> Config:
    config_file = folder / "config.yaml"
    if not config_file.is_file():
        raise ExportError(f"{config_file} is missing: this checkpoint cannot be rebuilt without its run config")
    return load_config(config_file)


def checkpoint_dtype(folder: Path) -> torch.dtype:
    """The dtype the engine computed in, read from the DeepSpeed config stored in its model-states file."""
    if not sorted(folder.glob("*mp_rank_00_model_states.pt")):
        raise ExportError(f"{folder} has no DeepSpeed *_model_states.pt file: not a DeepSpeed checkpoint")
    # mmap: a ZeRO-1/2 model-states file holds the full 16-bit weights; only the config is read here.
    ds_config = _model_states(folder).get("ds_config") or {}
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def consolidated_state(folder: Path) -> dict:
    """The student module's weights (``checkpoint.module_state``: any ZeRO stage, frozen weights included), lazily:
    values materialise on ``.contiguous()``; anything outside the student module is refused."""
    try:
        state = module_state(folder, lazy=True)
    except CheckpointError as error:
        raise ExportError(str(error)) from error
    unknown = [key for key in state if not key.startswith(MODULE_PREFIXES)]
    if unknown:
        raise ExportError(f"{folder} holds {len(unknown)} tensors outside the student module (e.g. {unknown[0]}): "
                          f"not a kd_pipeline student checkpoint")
    return state


def _model_states(folder: Path) -> dict:
    """Rank 0's ``*_model_states.pt`` (memory-mapped: tensors are read only when used)."""
    states = sorted(folder.glob("*mp_rank_00_model_states.pt"))
    return torch.load(states[0], map_location="cpu", weights_only=True, mmap=True)


# ----------------------------------------------------------------------------------------------------- rebuild


def load_student_weights(model: torch.nn.Module, state: dict) -> None:
    """Copy every ``llava.*`` tensor of ``state`` into ``model``; any missing, extra or reshaped key is refused."""
    expected = model.state_dict()
    given = {key.removeprefix("llava."): key for key in state if key.startswith("llava.")}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing or unexpected:
        parts = [f"{len(missing)} missing (e.g. {missing[0]})"] if missing else []
        parts += [f"{len(unexpected)} unexpected (e.g. {unexpected[0]})"] if unexpected else []
        raise ExportError(f"the checkpoint does not match the student built from its config.yaml: "
                          f"{', '.join(parts)}; was config.yaml edited after training?")
    with torch.no_grad():
        for name, target in tqdm(expected.items(), desc="loading weights", unit="tensor"):
            source = state[given[name]]
            if tuple(source.shape) != tuple(target.shape):
                raise ExportError(f"config mismatch: {name} is {tuple(source.shape)} in the checkpoint but "
                                  f"{tuple(target.shape)} in the student built from its config.yaml (same tokenizer "
                                  f"and model sizes as in training?)")
            target.copy_(source.contiguous())


def rebuild_student(config: Config, state: dict, tokenizer) -> torch.nn.Module:
    """The trained student on CPU in float32: ``create_model`` from the run config, then the checkpoint's weights."""
    from kd_pipeline.models import create_model
    from kd_pipeline.tokenizer import image_token_id

    # Attention backend and recomputation do not change the weights; sdpa runs on any CPU box (flash-attn needs CUDA).
    student_cfg = dataclasses.replace(config.student, attn_implementation="sdpa", gradient_checkpointing=False)
    model = create_model(student_cfg, vocab_size=len(tokenizer), image_token_id=image_token_id(tokenizer),
                         dtype=torch.float32, device="cpu")
    load_student_weights(model, state)
    return model.eval()


def feature_map_tensors(state: dict) -> dict[str, torch.Tensor]:
    """P's tensors keyed without the ``feature_map.`` prefix (empty when P is the identity)."""
    return {key.removeprefix("feature_map."): value.contiguous()
            for key, value in state.items() if key.startswith("feature_map.")}


# ----------------------------------------------------------------------------------------------------- writing


def llava_processor(model: torch.nn.Module, tokenizer):
    """transformers' ``LlavaProcessor`` for ``model``: GeoChat's image preprocessing at the tower's size, the
    tokenizer, ``<image>`` expanded to the model's image-token count, and GeoChat's chat templates by name."""
    from transformers import LlavaProcessor

    from kd_pipeline.data.images import image_processor
    from kd_pipeline.models import unwrap_model
    from kd_pipeline.prompts import IMAGE_TOKEN, chat_template

    config = unwrap_model(model).config
    templates = {"default": chat_template("llava_v1"), "llava_v1": chat_template("llava_v1"),
                 "vicuna_v1": chat_template("vicuna_v1")}
    # (S / P)^2 patch tokens + CLIP's class token (num_additional_image_tokens), which the "default" feature
    # strategy drops again: the processor then writes as many <image> ids as the model has image features.
    return LlavaProcessor(image_processor=image_processor(config.vision_config.image_size), tokenizer=tokenizer,
                          patch_size=config.vision_config.patch_size,
                          vision_feature_select_strategy=config.vision_feature_select_strategy,
                          num_additional_image_tokens=1, image_token=IMAGE_TOKEN, chat_template=templates)


def write_hf_folder(model: torch.nn.Module, folder: Path, *, merge_lora: bool, dtype: torch.dtype,
                    tokenizer, tokenizer_dir: Path) -> bool:
    """The transformers folder (weights, config, generation config, processor, tokenizer); returns whether LoRA
    was merged."""
    from peft import PeftModel

    from kd_pipeline.eval.generate import greedy_generation_config
    from kd_pipeline.tokenizer import complete_tokenizer_folder

    merged = False
    if isinstance(model, PeftModel):
        if merge_lora:
            # Merged in float32 (the masters), cast afterwards: one rounding instead of two.
            model = model.merge_and_unload()
            merged = True
        else:
            model.peft_config[model.active_adapter].base_model_name_or_path = None
            model.to(dtype).save_pretrained(str(folder))
            (folder / "README.md").unlink(missing_ok=True)  # peft's blank model-card template
            # unload() removes the adapter layers and keeps every base weight as trained.
            model = model.unload()
    model.generation_config = greedy_generation_config(tokenizer)
    model.to(dtype).save_pretrained(str(folder), max_shard_size="5GB")
    llava_processor(model, tokenizer).save_pretrained(str(folder))  # processor, image processor, tokenizer, templates
    complete_tokenizer_folder(folder, tokenizer_dir)
    return merged


def write_extras(folder: Path, source: Path, feature_map: dict[str, torch.Tensor], provenance: dict) -> None:
    """P, the run config and the provenance record, beside the model files."""
    if feature_map:
        metadata = {"format": "pt"}
        weight = next((tensor for tensor in feature_map.values() if tensor.ndim == 2), None)  # (H_t, H_s)
        if weight is not None:
            metadata.update(in_features=str(weight.shape[1]), out_features=str(weight.shape[0]))
        save_file(feature_map, folder / "feature_map.safetensors", metadata=metadata)
    else:
        log.info("P is the identity here (no teacher, or equal hidden sizes): no feature_map.safetensors")
    shutil.copyfile(source / "config.yaml", folder / "run_config.yaml")
    (folder / "export.json").write_text(json.dumps(provenance, indent=2))


def write_geochat_folder(model: torch.nn.Module, folder: Path, *, dtype: torch.dtype, tokenizer,
                          tokenizer_dir: Path) -> bool:
    """A merged transformers folder in a scratch sibling, then ``hf_to_geochat`` into ``folder`` (which is empty).

    The scratch weights are written with ``convert.write_weights`` under the in-memory state-dict keys, the layout
    ``hf_to_geochat`` reads (transformers' ``save_pretrained`` renames keys on disk to its legacy layout).
    """
    from peft import PeftModel

    from kd_pipeline.convert import hf_to_geochat, write_weights
    from kd_pipeline.eval.generate import greedy_generation_config
    from kd_pipeline.tokenizer import save_tokenizer

    merged = isinstance(model, PeftModel)
    llava = model.merge_and_unload() if merged else model
    llava = llava.to(dtype)
    scratch = folder.with_name(folder.name + ".hf")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        write_weights(llava.state_dict(), scratch)
        llava.config.save_pretrained(str(scratch))
        greedy_generation_config(tokenizer).save_pretrained(str(scratch))
        save_tokenizer(tokenizer, scratch, source_dir=tokenizer_dir)
        hf_to_geochat(scratch, folder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return merged


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, merge_lora: bool = False, out_format: str = "hf",
                      dtype: str = "auto", check_hashes: bool = True) -> Path:
    """Export ``checkpoint`` (a checkpoint or run folder) to ``out``; see the module docstring. Returns ``out``."""
    from kd_pipeline.convert import staging_folder
    from kd_pipeline.tokenizer import load_tokenizer, tokenizer_folder

    if out_format not in ("hf", "geochat"):
        raise ExportError(f"--format {out_format!r} is not one of hf, geochat")
    if dtype != "auto" and dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # checked before the slow work
        raise ExportError(f"--out {out} already exists and is not empty: choose another folder or remove it")
    folder = verified_folder(checkpoint, check_hashes=check_hashes)
    config = checkpoint_config(folder)
    out_dtype = checkpoint_dtype(folder) if dtype == "auto" else DTYPES[dtype]
    tokenizer_dir = tokenizer_folder(config)  # the run's rule: data.tokenizer, else student.path
    tokenizer = load_tokenizer(tokenizer_dir)
    state = consolidated_state(folder)
    model = rebuild_student(config, state, tokenizer)
    feature_map = feature_map_tensors(state)
    del state
    trainer_state = json.loads((folder / "trainer_state.json").read_text()) \
        if (folder / "trainer_state.json").is_file() else {}
    if out_format == "geochat" and not merge_lora and config.student.lora:
        log.info("GeoChat's layout has no adapter form here: merging LoRA into the weights")
    with staging_folder(out) as partial:
        if out_format == "hf":
            merged = write_hf_folder(model, partial, merge_lora=merge_lora, dtype=out_dtype, tokenizer=tokenizer,
                                     tokenizer_dir=tokenizer_dir)
        else:
            merged = write_geochat_folder(model, partial, dtype=out_dtype, tokenizer=tokenizer,
                                           tokenizer_dir=tokenizer_dir)
        provenance = {"checkpoint": str(folder.resolve()), "tag": folder.name, "step": trainer_state.get("step"),
                      "stage": config.run.stage, "format": out_format, "dtype": str(out_dtype).removeprefix("torch."),
                      "lora": config.student.lora, "lora_merged": merged}
        write_extras(partial, folder, feature_map, provenance)
    log.info("exported %s (step %s) to %s as %s, %s", folder, trainer_state.get("step"), out, out_format,
             provenance["dtype"])
    return out


# ----------------------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kd_pipeline.export",
                                     description="Consolidate a ZeRO checkpoint into a transformers or GeoChat folder.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint folder (.../checkpoints/step_00000050) or a run output folder "
                             "(its best checkpoint, else its latest)")
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--merge-lora", action="store_true",
                        help="merge LoRA adapters into the weights (default: base weights + adapter files)")
    parser.add_argument("--format", choices=("hf", "geochat"), default="hf", help="output layout")
    parser.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                        help="weight dtype; auto = what the engine computed in (bf16 on GPU runs)")
    parser.add_argument("--no-hash-check", action="store_true",
                        help="check only file sizes against COMPLETE.json, not sha256 (faster on huge checkpoints)")
    return parser.parse_args(argv)


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = export_checkpoint(args.checkpoint, args.out, merge_lora=args.merge_lora, out_format=args.format,
                            dtype=args.dtype, check_hashes=not args.no_hash_check)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

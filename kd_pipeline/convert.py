"""Convert checkpoints between GeoChat (LLaVA-style) folders and transformers LLaVA folders.

Runbook::

    # GeoChat -> transformers (tower from --vision-tower when given, as GeoChat's loader does; else the stored one)
    python -m kd_pipeline.convert geochat-to-hf --src GeoChat-7B --dst hf/geochat-7b \
        --vision-tower clip-vit-large-patch14-336 [--image-size 504]
    # transformers -> GeoChat (so GeoChat's own code can serve a distilled student; keep "geochat" in the name:
    # GeoChat's builder only loads the multimodal model when the folder name contains it)
    python -m kd_pipeline.convert hf-to-geochat --src runs/kd/best_hf --dst export/geochat-7b-distilled

geochat-to-hf: reads ``config.json`` (LLaMA fields + ``mm_*``), the weights (``pytorch_model*.bin`` + index, or
safetensors, single or sharded; pickles only with ``weights_only=True``) and ``tokenizer.model``; drops
``rotary_emb.inv_freq``; maps keys by part suffix (``convert_keys``) onto the installed transformers' layout;
interpolates the CLIP position table to ``image_size`` as GeoChat does (``models.vision``); gives ``<image>`` the id
after the tokenizer's tokens and a row there: when every row has a token (GeoChat's 32000), a new row appended to the
embedding and the lm_head, initialised to the **mean of the existing rows** (what LLaVA/GeoChat's own
``initialize_vision_tokenizer`` does for new tokens; LLaVA-HF's converter samples around that same mean with a tiny
covariance, which we skip to stay deterministic); when the table is padded beyond the tokenizer (LLaVA-HF's 32064
rows for 32000 tokens), every row is kept and ``<image>`` takes the first row without a token, with its stored
values (the log says so). Writes safetensors shards, ``config.json`` and the tokenizer.

hf-to-geochat: the inverse for the LLM and projector (bit-exact tensors; an appended ``<image>`` row is dropped, a
padded table is kept whole), a GeoChat ``config.json`` (``model_type: geochat`` and the ``mm_*`` fields),
``tokenizer.model`` and GeoChat's tokenizer config (plus the ``llava_v1`` chat template), ``generation_config.json``
when the source has one, weights as safetensors shards (``format: pt`` metadata, as transformers 4.31 requires). The
vision tower is not written: GeoChat's loader never reads stored tower weights, it reloads CLIP from
``mm_vision_tower`` and interpolates its position table itself.

Output is written to ``DST.partial`` and renamed when complete; an existing non-empty ``DST`` is refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from kd_pipeline.convert_keys import (CLIP_NON_VISION_PREFIXES, GEOCHAT_TOWER_PREFIX, embedding_keys,
                                      geochat_key_map, is_dropped_buffer, is_tower_key, tower_suffix)
from kd_pipeline.errors import UserError, user_errors_exit
from kd_pipeline.models.layout import llava_layout
from kd_pipeline.models.vision import grid_side, interpolate_position_table
from kd_pipeline.prompts import chat_template
from kd_pipeline.tokenizer import image_token_id, load_tokenizer, save_tokenizer, write_tokenizer_config

log = logging.getLogger(__name__)

DEFAULT_VISION_TOWER = "openai/clip-vit-large-patch14-336"
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")
"""Weight layouts looked for, in this order (an index json lists its shards)."""
SELECT_FEATURE_TO_STRATEGY = {"patch": "default", "cls_patch": "full"}


class ConversionError(UserError, ValueError):
    """A checkpoint that cannot be converted; the message names the missing file, key or field."""


# ----------------------------------------------------------------------------------------------------- reading


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ConversionError(f"{what}: {path} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConversionError(f"{what}: {path} is not valid JSON ({error})") from error


def weight_files(folder: Path, what: str) -> list[Path]:
    """The weight files of ``folder``: the shards its index lists, or its single file."""
    for name in WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        weight_map = read_json(path, f"{what} weight index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConversionError(f"{what}: {path} has no weight_map")
        shards = [folder / shard for shard in sorted(set(weight_map.values()))]
        for shard in shards:
            if not shard.is_file():
                raise ConversionError(f"{what}: {shard} (listed in {path.name}) is missing")
        return shards
    raise ConversionError(f"{what}: {folder} has no weights (looked for {', '.join(WEIGHT_FILES)})")


def read_state_dict(folder: Path, what: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, on CPU. Pickles are read with ``weights_only=True`` only."""
    state: dict[str, torch.Tensor] = {}
    for path in tqdm(weight_files(folder, what), desc=f"reading {folder.name}", unit="file"):
        try:
            if path.suffix == ".safetensors":
                state.update(load_file(path))
            else:
                state.update(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as error:  # a truncated or non-tensor pickle: name the file, keep the cause
            raise ConversionError(f"{what}: cannot read {path}: {error}") from error
    return state


# ----------------------------------------------------------------------------------------------------- writing


def write_weights(state: dict[str, torch.Tensor], folder: Path, max_shard_size: int | str = "5GB") -> None:
    """safetensors shards (``model-0000i-of-0000n.safetensors`` + index when more than one) with pt metadata."""
    split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    for filename, keys in tqdm(split.filename_to_tensors.items(), desc=f"writing {folder.name}", unit="shard"):
        save_file({key: state[key].contiguous() for key in keys}, folder / filename, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


@contextmanager
def staging_folder(dst: Path) -> Iterator[Path]:
    """Yield ``DST.partial`` to write into; rename it to ``dst`` on success, remove it on failure."""
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ConversionError(f"{dst} already exists and is not empty: choose another --dst or remove it")
    partial = dst.with_name(dst.name + ".partial")
    if partial.exists():  # left by an interrupted run of this tool
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if dst.exists():
        dst.rmdir()
    partial.rename(dst)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def append_mean_row(table: torch.Tensor) -> torch.Tensor:
    """(V, H) -> (V + 1, H): the new row is the mean of the existing ones (computed in float32)."""
    return torch.cat([table, table.float().mean(dim=0, keepdim=True).to(table.dtype)], dim=0)


# ----------------------------------------------------------------------------------------------------- vision tower


def clip_folder_tower(clip_dir: Path) -> tuple[dict[str, torch.Tensor], CLIPVisionConfig]:
    """Tower tensors (by suffix) and config of a CLIPModel or CLIPVisionModel folder in transformers format."""
    read_json(clip_dir / "config.json", "CLIP vision tower config")
    config = CLIPVisionConfig.from_pretrained(str(clip_dir), local_files_only=True)
    state = read_state_dict(clip_dir, "CLIP vision tower")
    tower = {tower_suffix(key): tensor for key, tensor in state.items()
             if not key.startswith(CLIP_NON_VISION_PREFIXES) and not is_dropped_buffer(key)}
    return tower, config


def infer_tower_config(tower: dict[str, torch.Tensor], vision_heads: int | None) -> CLIPVisionConfig:
    """A CLIP vision config from tower tensor shapes (checkpoint-stored towers carry no config).

    The head count is not in any shape: OpenAI's CLIP towers all use 64-dim heads, so ``hidden // 64`` unless
    ``vision_heads`` says otherwise.
    """
    def shape_of(suffix: str) -> torch.Size:
        if suffix not in tower:
            raise ConversionError(f"vision tower tensor {GEOCHAT_TOWER_PREFIX}{suffix} is missing from the checkpoint")
        return tower[suffix].shape

    hidden = shape_of("embeddings.class_embedding")[0]
    patch = shape_of("embeddings.patch_embedding.weight")[-1]
    layers = 1 + max((int(key.split(".")[2]) for key in tower if key.startswith("encoder.layers.")), default=-1)
    intermediate = shape_of("encoder.layers.0.mlp.fc1.weight")[0]
    native_size = grid_side(shape_of("embeddings.position_embedding.weight")[0]) * patch
    heads = vision_heads or max(hidden // 64, 1)
    if hidden % heads:
        raise ConversionError(f"vision tower hidden size {hidden} is not divisible by {heads} heads: "
                              "pass --vision-heads")
    log.info("vision tower from the checkpoint: hidden %d, %d layers, %d heads, MLP %d, patch %d, trained at %d px",
             hidden, layers, heads, intermediate, patch, native_size)
    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                            num_attention_heads=heads, patch_size=patch, image_size=native_size,
                            hidden_act="quick_gelu", layer_norm_eps=1e-5)


def select_tower(source: dict[str, torch.Tensor], src: Path, clip_dir: Path | None,
                 vision_heads: int | None) -> tuple[dict[str, torch.Tensor], CLIPVisionConfig]:
    """``--vision-tower`` when given (as GeoChat's loader, which reloads CLIP), else the checkpoint's own tower."""
    stored = {tower_suffix(key): tensor for key, tensor in source.items() if is_tower_key(key)}
    if clip_dir is not None:
        if stored:
            log.info("ignoring the %d vision tower tensors stored in %s: using --vision-tower %s",
                     len(stored), src, clip_dir)
        return clip_folder_tower(clip_dir)
    if stored:
        return stored, infer_tower_config(stored, vision_heads)
    raise ConversionError(f"{src} stores no vision tower ({GEOCHAT_TOWER_PREFIX}*): pass --vision-tower CLIP_DIR "
                          f"({DEFAULT_VISION_TOWER} in transformers format)")


# ----------------------------------------------------------------------------------------------------- GeoChat -> HF


def _required(config: dict, field: str, src: Path):
    if field not in config:
        raise ConversionError(f"{src / 'config.json'} has no {field!r}: not a GeoChat/LLaVA checkpoint config")
    return config[field]


def hf_config_from_geochat(geochat: dict, src: Path, vision: CLIPVisionConfig, *, vocab_size: int,
                           image_token_id: int, image_size: int) -> LlavaConfig:
    """The LlavaConfig of a converted GeoChat checkpoint (LLaMA fields and ``mm_*`` fields of its config.json)."""
    projector_type = _required(geochat, "mm_projector_type", src)
    if projector_type != "mlp2x_gelu":
        raise ConversionError(f"{src / 'config.json'}: mm_projector_type {projector_type!r} is not supported "
                              "(GeoChat uses mlp2x_gelu)")
    if geochat.get("mm_use_im_start_end"):
        raise ConversionError(f"{src / 'config.json'}: mm_use_im_start_end=true is not supported (GeoChat: false)")
    if geochat.get("rope_scaling"):
        raise ConversionError(f"{src / 'config.json'}: rope_scaling {geochat['rope_scaling']} is not supported")
    select_feature = geochat.get("mm_vision_select_feature", "patch")
    if select_feature not in SELECT_FEATURE_TO_STRATEGY:
        raise ConversionError(f"{src / 'config.json'}: mm_vision_select_feature {select_feature!r} is not "
                              f"one of {', '.join(SELECT_FEATURE_TO_STRATEGY)}")
    if geochat.get("mm_hidden_size", vision.hidden_size) != vision.hidden_size:
        raise ConversionError(f"{src / 'config.json'}: mm_hidden_size {geochat['mm_hidden_size']} does not match "
                              f"the vision tower's hidden size {vision.hidden_size}")
    heads = _required(geochat, "num_attention_heads", src)
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=_required(geochat, "hidden_size", src),
                       intermediate_size=_required(geochat, "intermediate_size", src),
                       num_hidden_layers=_required(geochat, "num_hidden_layers", src), num_attention_heads=heads,
                       num_key_value_heads=geochat.get("num_key_value_heads") or heads,
                       hidden_act=geochat.get("hidden_act", "silu"), rms_norm_eps=geochat.get("rms_norm_eps", 1e-5),
                       max_position_embeddings=geochat.get("max_position_embeddings", 4096),
                       rope_parameters={"rope_type": "default", "rope_theta": float(geochat.get("rope_theta", 1e4))},
                       attention_bias=geochat.get("attention_bias", False), tie_word_embeddings=False,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = CLIPVisionConfig(**{**vision.to_dict(), "image_size": image_size})
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                         image_seq_length=(image_size // vision.patch_size) ** 2, projector_hidden_act="gelu",
                         multimodal_projector_bias=True,
                         vision_feature_layer=int(geochat.get("mm_vision_select_layer", -2)),
                         vision_feature_select_strategy=SELECT_FEATURE_TO_STRATEGY[select_feature],
                         tie_word_embeddings=False)
    # Kept for the way back (hf-to-geochat writes it as mm_vision_tower); transformers ignores it.
    config.mm_vision_tower = geochat.get("mm_vision_tower", DEFAULT_VISION_TOWER)
    return config


def geochat_to_hf(src: str | Path, dst: str | Path, vision_tower: str | Path | None = None, image_size: int = 504,
                  vision_heads: int | None = None, max_shard_size: int | str = "5GB") -> Path:
    """Convert a GeoChat checkpoint folder ``src`` into a transformers LLaVA folder ``dst``; returns ``dst``."""
    src, dst = Path(src), Path(dst)
    geochat = read_json(src / "config.json", "GeoChat config")
    if not (src / "tokenizer.model").is_file():
        raise ConversionError(f"{src / 'tokenizer.model'} is missing: GeoChat checkpoints ship LLaMA's "
                              "SentencePiece model; copy it from the base Vicuna folder")
    source = read_state_dict(src, "GeoChat checkpoint")
    dropped = [key for key in source if is_dropped_buffer(key)]
    if dropped:
        log.info("dropping %d stored buffers (e.g. %s): transformers recomputes them", len(dropped), dropped[0])
    source = {key: tensor for key, tensor in source.items() if not is_dropped_buffer(key)}
    tower, vision = select_tower(source, src, Path(vision_tower) if vision_tower else None, vision_heads)
    if image_size % vision.patch_size:
        raise ConversionError(f"--image-size {image_size} is not a multiple of the patch size {vision.patch_size}")
    source = {key: tensor for key, tensor in source.items() if not is_tower_key(key)}

    tokenizer = load_tokenizer(src)
    image_id = image_token_id(tokenizer)
    embed_name = "model.embed_tokens.weight"
    if embed_name not in source:
        raise ConversionError(f"{src}: key {embed_name} is missing from the checkpoint")
    rows = source[embed_name].shape[0]
    if image_id > rows:
        raise ConversionError(f"{src}: {embed_name} has {rows} rows but the tokenizer names {image_id} tokens before "
                              "<image>: every token needs a row (is this the checkpoint's own tokenizer? GeoChat lists "
                              "added ones such as <im_patch> in added_tokens.json)")
    padded = image_id < rows
    if padded:
        log.info("%s: %s has %d rows, the tokenizer %d tokens: a padded vocabulary. Keeping all %d rows; <image> "
                 "takes id %d, the first row without a token (its stored values are kept, like those of the other "
                 "%d padding rows: no token ever feeds them)", src, embed_name, rows, image_id, rows, image_id,
                 rows - image_id - 1)
    config = hf_config_from_geochat(geochat, src, vision, vocab_size=rows if padded else rows + 1,
                                    image_token_id=image_id, image_size=image_size)
    config.geochat_vocab_size = rows  # for the way back: hf-to-geochat restores exactly these rows
    with torch.device("meta"):
        template = LlavaForConditionalGeneration(config)
    layout = llava_layout(template)
    target_shapes = {key: tensor.shape for key, tensor in template.state_dict().items()}
    names = geochat_key_map(target_shapes, layout)

    unknown = sorted(set(source) - set(names))
    if unknown:
        raise ConversionError(f"{src}: {len(unknown)} keys are not GeoChat/LLaVA keys, e.g. {unknown[:3]}")
    converted: dict[str, torch.Tensor] = {}
    for name, hf_key in tqdm(names.items(), desc="mapping keys", unit="tensor"):
        if is_tower_key(name):
            where = vision_tower or src
            tensor = tower.pop(tower_suffix(name), None)
        else:
            where = src
            tensor = source.get(name)
        if tensor is None:
            raise ConversionError(f"{where}: key {name} is missing (needed for {hf_key})")
        converted[hf_key] = tensor
    if tower and not vision_tower:
        raise ConversionError(f"{src}: vision tower keys not used by CLIP, e.g. {sorted(tower)[:3]}")

    embed_key, head_key = embedding_keys(layout, converted)
    if not padded:
        converted[embed_key] = append_mean_row(converted[embed_key])  # (V + 1, H): <image> at id V
        converted[head_key] = append_mean_row(converted[head_key])
    table_key = f"{layout.position_embedding}.weight"
    converted[table_key] = interpolate_position_table(converted[table_key], image_size // vision.patch_size)
    for key, tensor in converted.items():
        if tensor.shape != target_shapes[key]:
            raise ConversionError(f"{src}: {key} has shape {tuple(tensor.shape)}, the config expects "
                                  f"{tuple(target_shapes[key])}")
    config.dtype = converted[embed_key].dtype
    with staging_folder(dst) as folder:
        write_weights(converted, folder, max_shard_size)
        config.save_pretrained(str(folder))
        save_tokenizer(tokenizer, folder, source_dir=src)
    log.info("wrote %s: %d tensors, <image> id %d, %d image tokens", dst, len(converted), image_id,
             config.image_seq_length)
    return dst


# ----------------------------------------------------------------------------------------------------- HF -> GeoChat


def geochat_config_from_hf(config: LlavaConfig, vocab_size: int, dtype: torch.dtype,
                           vision_tower_name: str | None) -> dict:
    """GeoChat's config.json: LLaMA fields, ``model_type: geochat`` and the ``mm_*`` fields its builder reads."""
    text, vision = config.text_config, config.vision_config
    rope = text.rope_parameters or {}
    if rope.get("rope_type", "default") != "default":
        raise ConversionError(f"rope {rope} is not supported by GeoChat's LLaMA")
    strategies = {strategy: feature for feature, strategy in SELECT_FEATURE_TO_STRATEGY.items()}
    return {
        "architectures": ["GeoChatLlamaForCausalLM"], "model_type": "geochat",
        "hidden_size": text.hidden_size, "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers, "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads, "hidden_act": text.hidden_act,
        "rms_norm_eps": text.rms_norm_eps, "max_position_embeddings": text.max_position_embeddings,
        "rope_theta": rope.get("rope_theta", 10000.0), "rope_scaling": None,
        "initializer_range": text.initializer_range, "pretraining_tp": 1, "vocab_size": vocab_size,
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
        "use_cache": True, "torch_dtype": dtype_name(dtype),
        "mm_vision_tower": vision_tower_name or getattr(config, "mm_vision_tower", None) or DEFAULT_VISION_TOWER,
        "mm_hidden_size": vision.hidden_size, "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": config.vision_feature_layer,
        "mm_vision_select_feature": strategies[config.vision_feature_select_strategy],
        "image_aspect_ratio": "pad", "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
        "use_mm_proj": True, "tune_mm_mlp_adapter": False, "freeze_mm_mlp_adapter": False,
        "image_grid_pinpoints": None,
    }


def write_geochat_tokenizer(src: Path, folder: Path, image_id: int) -> None:
    """tokenizer.model + GeoChat's tokenizer config, and added_tokens.json for rows between the SentencePiece
    vocabulary and ``<image>`` (e.g. ``<im_patch>``), so GeoChat's slow tokenizer gives the same ids."""
    import sentencepiece as spm

    tokenizer = load_tokenizer(src)
    if image_token_id(tokenizer) != image_id:
        raise ConversionError(f"{src}: the tokenizer's <image> is id {image_token_id(tokenizer)} but config.json "
                              f"says image_token_id {image_id}")
    shutil.copyfile(src / "tokenizer.model", folder / "tokenizer.model")
    write_tokenizer_config(folder, chat_template=chat_template("llava_v1"))
    pieces = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model")).get_piece_size()
    added = {tokenizer.convert_ids_to_tokens(token_id): token_id for token_id in range(pieces, image_id)}
    if added:
        (folder / "added_tokens.json").write_text(json.dumps(added, indent=2))


def hf_to_geochat(src: str | Path, dst: str | Path, vision_tower_name: str | None = None,
                  max_shard_size: int | str = "5GB") -> Path:
    """Convert a transformers LLaVA folder ``src`` (e.g. a distilled student) into a GeoChat folder ``dst``."""
    src, dst = Path(src), Path(dst)
    model_type = read_json(src / "config.json", "transformers LLaVA config").get("model_type")
    if model_type != "llava":
        raise ConversionError(f"{src / 'config.json'} has model_type {model_type!r}, not 'llava': not a transformers "
                              "LLaVA folder (a GeoChat folder converts with geochat-to-hf)")
    if not (src / "tokenizer.model").is_file():
        raise ConversionError(f"{src / 'tokenizer.model'} is missing: GeoChat's slow tokenizer needs the "
                              "SentencePiece model (copy it from the GeoChat or Vicuna folder)")
    config = LlavaConfig.from_pretrained(str(src), local_files_only=True)
    state = read_state_dict(src, "transformers LLaVA checkpoint")
    with torch.device("meta"):
        template = LlavaForConditionalGeneration(config)
    layout = llava_layout(template)
    expected = list(template.state_dict())
    missing = [key for key in expected if key not in state]
    if missing and not any(key.startswith(layout.language_model + ".") for key in state):
        # A save_pretrained folder: transformers 5 writes LLaVA under other key names on disk
        # (language_model.model.*, vision_tower.*) than its modules use and maps them itself on load. Let it, in the
        # stored dtype, and still refuse anything missing or unexpected.
        model, info = LlavaForConditionalGeneration.from_pretrained(
            str(src), local_files_only=True, dtype=next(iter(state.values())).dtype, output_loading_info=True)
        state = model.state_dict()
        missing = sorted(info["missing_keys"]) + [key for key in expected if key not in state]
        if info["unexpected_keys"]:
            state.update({key: torch.empty(0) for key in info["unexpected_keys"]})
    if missing:
        raise ConversionError(f"{src}: key {missing[0]} is missing ({len(missing)} missing in all)")
    unknown = sorted(set(state) - set(expected))
    if unknown:
        hint = " (merge LoRA adapters into the weights first)" if any("lora_" in key for key in unknown) else ""
        raise ConversionError(f"{src}: {len(unknown)} unexpected keys, e.g. {unknown[:3]}{hint}")

    image_id = config.image_token_id
    embed_key, head_key = embedding_keys(layout, expected)
    rows = state[embed_key].shape[0]
    if rows <= image_id:
        raise ConversionError(f"{src}: image_token_id {image_id} is not a row of {embed_key} ({rows} rows)")
    # GeoChat's <image> is a placeholder id, not a row. Appended after the vocabulary (the usual case), its row is
    # dropped; inside a padded vocabulary every row is kept and <image>'s becomes padding too. A folder converted
    # from GeoChat records which (geochat_vocab_size), so a table with a single padding row also comes back whole.
    kept_rows = getattr(config, "geochat_vocab_size", None) or (image_id if rows == image_id + 1 else rows)
    if not image_id <= kept_rows <= rows:
        raise ConversionError(f"{src / 'config.json'}: geochat_vocab_size {kept_rows} does not fit {rows} rows with "
                              f"<image> at {image_id}")
    if kept_rows == rows:
        log.info("%s: padded vocabulary (%d rows, <image> at %d): keeping every row; GeoChat's vocab_size is %d",
                 src, rows, image_id, rows)
    converted: dict[str, torch.Tensor] = {}
    for name, hf_key in tqdm(geochat_key_map(expected, layout).items(), desc="mapping keys", unit="tensor"):
        if is_tower_key(name):
            continue
        tensor = state[hf_key]
        converted[name] = tensor[:kept_rows] if hf_key in (embed_key, head_key) else tensor
    dtype = state[embed_key].dtype
    with staging_folder(dst) as folder:
        write_weights(converted, folder, max_shard_size)
        geochat = geochat_config_from_hf(config, kept_rows, dtype, vision_tower_name)
        (folder / "config.json").write_text(json.dumps(geochat, indent=2))
        write_geochat_tokenizer(src, folder, image_id)
        if (src / "generation_config.json").is_file():  # decoding defaults (an export's: greedy to EOS)
            shutil.copyfile(src / "generation_config.json", folder / "generation_config.json")
    if "geochat" not in dst.name.lower():
        log.warning("GeoChat's builder loads the multimodal model only when the folder name contains 'geochat': "
                    "rename %s", dst)
    log.info("wrote %s: %d tensors (vision tower not stored: GeoChat reloads %s)", dst, len(converted),
             geochat["mm_vision_tower"])
    return dst


# ----------------------------------------------------------------------------------------------------- CLI


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kd_pipeline.convert",
                                     description="Convert GeoChat checkpoints to and from transformers LLaVA folders.")
    commands = parser.add_subparsers(dest="command", required=True)
    to_hf = commands.add_parser("geochat-to-hf", help="GeoChat/LLaVA folder -> transformers LLaVA folder")
    to_hf.add_argument("--src", required=True, help="GeoChat checkpoint folder (config.json, weights, tokenizer.model)")
    to_hf.add_argument("--dst", required=True, help="output folder (must not exist or be empty)")
    to_hf.add_argument("--vision-tower", default=None,
                       help="CLIP folder in transformers format (CLIPModel or CLIPVisionModel); "
                            "needed when the checkpoint stores no tower")
    to_hf.add_argument("--image-size", type=int, default=504, help="input resolution (GeoChat: 504)")
    to_hf.add_argument("--vision-heads", type=int, default=None,
                       help="tower attention heads when the tower comes from the checkpoint (default hidden/64)")
    to_hf.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard")
    to_geochat = commands.add_parser("hf-to-geochat", help="transformers LLaVA folder -> GeoChat folder")
    to_geochat.add_argument("--src", required=True, help="transformers LLaVA folder (with tokenizer.model)")
    to_geochat.add_argument("--dst", required=True, help="output folder; keep 'geochat' in its name")
    to_geochat.add_argument("--vision-tower-name", default=None,
                            help=f"mm_vision_tower to write (default: the one recorded at conversion, "
                                 f"else {DEFAULT_VISION_TOWER})")
    to_geochat.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "geochat-to-hf":
        out = geochat_to_hf(args.src, args.dst, vision_tower=args.vision_tower, image_size=args.image_size,
                            vision_heads=args.vision_heads, max_shard_size=args.max_shard_size)
    else:
        out = hf_to_geochat(args.src, args.dst, vision_tower_name=args.vision_tower_name,
                            max_shard_size=args.max_shard_size)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

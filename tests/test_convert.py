"""GeoChat <-> transformers conversion on a tiny GeoChat-format checkpoint written here with real key names.

The reference forward is built independently of kd_pipeline: a LlamaForCausalLM loaded with GeoChat's own LLM
keys, the projector written out by hand, CLIP with GeoChat's interpolation call (bicubic, align_corners=True), and
the image features spliced where GeoChat's -200 placeholder stands.
"""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import (CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM,
                          LlavaForConditionalGeneration)

from kd_pipeline.convert import ConversionError, geochat_to_hf, hf_to_geochat, main
from kd_pipeline.tokenizer import image_token_id, load_tokenizer

TOWER = "model.vision_tower.vision_tower.vision_model."
LLM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
# 128 hidden / 2 heads: the 64-dim heads the converter assumes for a checkpoint-stored tower.
CLIP_SIZES = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, patch_size=14,
                  image_size=56, hidden_act="quick_gelu", layer_norm_eps=1e-5)
NEW_SIZE = 84  # 4x4 -> 6x6 grid, the same 1.5x as 336 -> 504


def clip_tower(sizes: dict, seed: int) -> CLIPVisionModel:
    torch.manual_seed(seed)
    tower = CLIPVisionModel(CLIPVisionConfig(**sizes))
    with torch.no_grad():  # CLIP's init leaves biases at zero; make every tensor count
        for parameter in tower.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    return tower


def tower_keys(tower: CLIPVisionModel) -> dict[str, torch.Tensor]:
    """Suffixes as in CLIP's checkpoints (``embeddings.*``, ``encoder.*``, ...), whatever this release nests them in."""
    return {key.removeprefix("vision_model."): value.clone() for key, value in tower.state_dict().items()}


def write_geochat_checkpoint(folder, tokenizer_dir, *, with_tower: bool, extra_rows: int = 0,
                             name_extra_row: bool = True):
    """A GeoChat-7B-like folder in miniature: config.json, two .bin shards + index, tokenizer.model.

    ``extra_rows`` rows follow the SentencePiece vocabulary; with ``name_extra_row`` the last one is ``<im_patch>``
    in added_tokens.json (GeoChat's way of adding tokens), else they are padding that no token names."""
    folder.mkdir(parents=True)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(tokenizer_dir / name, folder / name)
    import sentencepiece as spm
    vocab = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model")).get_piece_size()
    vocab += extra_rows
    if extra_rows and name_extra_row:
        (folder / "added_tokens.json").write_text(json.dumps({"<im_patch>": vocab - 1}))
    torch.manual_seed(1)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, rms_norm_eps=1e-5, tie_word_embeddings=False, **LLM))
    state = {key: value.clone().half() for key, value in llama.state_dict().items()}
    for layer in range(LLM["num_hidden_layers"]):  # older checkpoints store this buffer
        state[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = torch.rand(8)
    hidden, vision_hidden = LLM["hidden_size"], CLIP_SIZES["hidden_size"]
    # The projector stays fp32, as in some GeoChat checkpoints: dtypes must survive the round trip.
    state["model.mm_projector.0.weight"] = 0.05 * torch.randn(hidden, vision_hidden)
    state["model.mm_projector.0.bias"] = 0.05 * torch.randn(hidden)
    state["model.mm_projector.2.weight"] = 0.05 * torch.randn(hidden, hidden)
    state["model.mm_projector.2.bias"] = 0.05 * torch.randn(hidden)
    if with_tower:
        for suffix, value in tower_keys(clip_tower(CLIP_SIZES, seed=2)).items():
            state[TOWER + suffix] = value.half()
        state[TOWER + "embeddings.position_ids"] = torch.arange(17).unsqueeze(0)
    keys = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    for name, shard_keys in shards.items():
        torch.save({key: state[key] for key in shard_keys}, folder / name)
    weight_map = {key: name for name, shard_keys in shards.items() for key in shard_keys}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"architectures": ["GeoChatLlamaForCausalLM"], "model_type": "geochat", "vocab_size": vocab,
              "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "hidden_act": "silu", "torch_dtype": "float16",
              "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
              "mm_vision_tower": "/models/clip-vit-large-patch14-336", "mm_hidden_size": vision_hidden,
              "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
              "image_aspect_ratio": "pad", "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
              "use_mm_proj": True, **LLM}
    (folder / "config.json").write_text(json.dumps(config))
    return state, vocab


def reference_logits(state, tower_state, vocab, text_before, text_after, pixel_values):
    """Logits of GeoChat's forward for ``text_before <image> text_after``, from the original tensors."""
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, rms_norm_eps=1e-5, tie_word_embeddings=False, **LLM))
    llama.load_state_dict({k: v.float() for k, v in state.items() if not k.startswith("model.mm_projector")
                           and not k.startswith(TOWER) and not k.endswith("inv_freq")})
    tower = CLIPVisionModel(CLIPVisionConfig(**{**CLIP_SIZES, "image_size": NEW_SIZE}))
    tower_weights = {k: v.float() for k, v in tower_state.items() if not k.endswith("position_ids")}
    table = tower_weights["embeddings.position_embedding.weight"]  # (17, D): GeoChat's clip_interpolate_embeddings
    grid = table[1:].t().reshape(1, -1, 4, 4)
    resized = F.interpolate(grid, size=6, mode="bicubic", align_corners=True).reshape(-1, 36).t()
    tower_weights["embeddings.position_embedding.weight"] = torch.cat([table[:1], resized])
    missing, unexpected = tower.load_state_dict(tower_weights, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing)
    with torch.no_grad():
        patches = tower(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]  # (1, 36, Dv)
        mid = F.gelu(F.linear(patches, state["model.mm_projector.0.weight"], state["model.mm_projector.0.bias"]))
        image = F.linear(mid, state["model.mm_projector.2.weight"], state["model.mm_projector.2.bias"])
        embed = llama.get_input_embeddings()
        inputs = torch.cat([embed(text_before), image[0], embed(text_after)]).unsqueeze(0)
        return llama(inputs_embeds=inputs).logits[0]


@pytest.fixture
def geochat_dir(tmp_path, tokenizer_dir):
    state, vocab = write_geochat_checkpoint(tmp_path / "GeoChat-tiny", tokenizer_dir, with_tower=True)
    return tmp_path / "GeoChat-tiny", state, vocab


def test_converted_checkpoint_loads_and_matches_the_reference_forward(geochat_dir, tmp_path):
    src, state, vocab = geochat_dir
    dst = tmp_path / "hf"
    assert main(["geochat-to-hf", "--src", str(src), "--dst", str(dst), "--image-size", str(NEW_SIZE),
                 "--max-shard-size", "100KB"]) == 0
    assert (dst / "model.safetensors.index.json").is_file() and (dst / "tokenizer.model").is_file()
    assert not (tmp_path / "hf.partial").exists()
    model = LlavaForConditionalGeneration.from_pretrained(dst, local_files_only=True, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(dst)
    assert image_token_id(tokenizer) == model.config.image_token_id == vocab and len(tokenizer) == vocab + 1
    assert model.config.image_seq_length == 36 and model.config.vision_config.image_size == NEW_SIZE

    text_before, text_after = torch.tensor([1, 40, 41, 42]), torch.tensor([50, 51, 52])
    input_ids = torch.cat([text_before, torch.full((36,), vocab), text_after]).unsqueeze(0)
    pixel_values = torch.randn(1, 3, NEW_SIZE, NEW_SIZE)
    with torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values=pixel_values).logits[0]  # (43, V + 1)
    tower_state = {k.removeprefix(TOWER): v for k, v in state.items() if k.startswith(TOWER)}
    expected = reference_logits(state, tower_state, vocab, text_before, text_after, pixel_values)
    torch.testing.assert_close(logits[:, :vocab], expected, atol=2e-4, rtol=1e-4)
    # The <image> rows are the mean of the original rows (embedding and lm_head).
    for hf_table, original in ((model.get_input_embeddings().weight, state["model.embed_tokens.weight"]),
                               (model.lm_head.weight, state["lm_head.weight"])):
        torch.testing.assert_close(hf_table[vocab], original.float().mean(0).half().float())


def write_clip_folder(folder, layout: str) -> dict[str, torch.Tensor]:
    """A CLIPModel folder (text + vision, safetensors, as openai's CLIP) or a CLIPVisionModel folder with a
    ``pytorch_model.bin`` whose keys sit under ``vision_model.`` (older transformers). Returns the tower by suffix."""
    torch.manual_seed(3)
    if layout == "clipmodel-safetensors":
        clip = CLIPModel(CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                     num_attention_heads=2, vocab_size=99),
                                    vision_config=CLIP_SIZES, projection_dim=16))
        clip.save_pretrained(folder)
        assert any(key.startswith("text_model.") for key in load_file(folder / "model.safetensors"))
        return tower_keys(clip.vision_model)
    tower = clip_tower(CLIP_SIZES, seed=3)
    folder.mkdir()
    tower.config.save_pretrained(folder)
    suffixes = tower_keys(tower)
    torch.save({"vision_model." + suffix: value for suffix, value in suffixes.items()}, folder / "pytorch_model.bin")
    return suffixes


@pytest.mark.parametrize("layout", ["clipmodel-safetensors", "visionmodel-bin"])
def test_tower_from_a_clip_folder_replaces_a_missing_one(tmp_path, tokenizer_dir, layout):
    state, vocab = write_geochat_checkpoint(tmp_path / "geochat", tokenizer_dir, with_tower=False)
    tower = write_clip_folder(tmp_path / "clip", layout)
    with pytest.raises(ConversionError, match="--vision-tower"):
        geochat_to_hf(tmp_path / "geochat", tmp_path / "no_tower", image_size=NEW_SIZE)
    geochat_to_hf(tmp_path / "geochat", tmp_path / "hf", vision_tower=tmp_path / "clip", image_size=NEW_SIZE)
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", local_files_only=True,
                                                          dtype=torch.float32).eval()
    for suffix, value in model.model.vision_tower.state_dict().items():
        suffix = suffix.removeprefix("vision_model.")
        if suffix == "embeddings.position_embedding.weight":
            assert value.shape == (37, 128)
            torch.testing.assert_close(value[0], tower[suffix][0])
        else:
            assert torch.equal(value, tower[suffix]), suffix

    text_before, text_after = torch.tensor([1, 40]), torch.tensor([50])
    input_ids = torch.cat([text_before, torch.full((36,), vocab), text_after]).unsqueeze(0)
    pixel_values = torch.randn(1, 3, NEW_SIZE, NEW_SIZE)
    with torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values=pixel_values).logits[0]
    expected = reference_logits(state, tower, vocab, text_before, text_after, pixel_values)
    torch.testing.assert_close(logits[:, :vocab], expected, atol=2e-4, rtol=1e-4)


def test_round_trip_reproduces_the_original_tensors_bit_exactly(geochat_dir, tmp_path):
    src, state, vocab = geochat_dir
    geochat_to_hf(src, tmp_path / "hf", image_size=NEW_SIZE)
    back = tmp_path / "geochat-back"
    assert main(["hf-to-geochat", "--src", str(tmp_path / "hf"), "--dst", str(back)]) == 0
    restored = load_file(back / "model.safetensors")
    expected = {k: v for k, v in state.items() if not k.startswith(TOWER) and not k.endswith("inv_freq")}
    assert set(restored) == set(expected)
    for key, value in expected.items():
        assert restored[key].dtype == value.dtype and torch.equal(restored[key], value), key
    config = json.loads((back / "config.json").read_text())
    assert config["model_type"] == "geochat" and config["architectures"] == ["GeoChatLlamaForCausalLM"]
    assert config["vocab_size"] == vocab and config["torch_dtype"] == "float16"
    assert {k: config[k] for k in ("mm_projector_type", "mm_hidden_size", "mm_vision_select_layer",
                                   "mm_vision_select_feature", "mm_use_im_patch_token", "mm_vision_tower")} == {
        "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 128, "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "mm_use_im_patch_token": False,
        "mm_vision_tower": "/models/clip-vit-large-patch14-336"}
    assert all(config[k] == v for k, v in LLM.items())
    assert (back / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()
    with open(back / "model.safetensors", "rb") as handle:  # transformers 4.31 (GeoChat) needs format=pt
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    assert header["__metadata__"] == {"format": "pt"}


def test_an_added_row_named_in_added_tokens_json_is_kept(tmp_path, tokenizer_dir):
    state, vocab = write_geochat_checkpoint(tmp_path / "geochat", tokenizer_dir, with_tower=True, extra_rows=1)
    geochat_to_hf(tmp_path / "geochat", tmp_path / "hf", image_size=NEW_SIZE)
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", local_files_only=True)
    assert model.config.image_token_id == vocab and model.get_input_embeddings().weight.shape[0] == vocab + 1
    hf_to_geochat(tmp_path / "hf", tmp_path / "geochat-back")
    restored = load_file(tmp_path / "geochat-back" / "model.safetensors")
    assert torch.equal(restored["model.embed_tokens.weight"], state["model.embed_tokens.weight"])
    added = json.loads((tmp_path / "geochat-back" / "added_tokens.json").read_text())
    assert added == {"<im_patch>": vocab - 1}


@pytest.mark.parametrize("padding", [1, 64])
def test_a_padded_vocabulary_keeps_every_row_and_places_image_after_the_tokens(tmp_path, tokenizer_dir, caplog,
                                                                               padding):
    """LLaVA-HF pads its table to 32064 rows for 32000 tokens; such a checkpoint converts with every row kept, <image>
    at the first row without a token (for tokenizer and config alike), the same forward, and comes back whole."""
    from kd_pipeline.config import ModelConfig
    from kd_pipeline.models import load_model

    state, rows = write_geochat_checkpoint(tmp_path / "geochat", tokenizer_dir, with_tower=True, extra_rows=padding,
                                           name_extra_row=False)
    pieces = rows - padding
    caplog.set_level("INFO")
    geochat_to_hf(tmp_path / "geochat", tmp_path / "hf", image_size=NEW_SIZE)
    assert f"has {rows} rows, the tokenizer {pieces} tokens: a padded vocabulary. Keeping all {rows} rows; <image> " \
           f"takes id {pieces}" in caplog.text
    tokenizer = load_tokenizer(tmp_path / "hf")
    model = load_model(ModelConfig(path=str(tmp_path / "hf"), image_size=NEW_SIZE), vocab_size=len(tokenizer),
                       image_token_id=image_token_id(tokenizer)).eval()  # more rows than tokens: accepted
    assert image_token_id(tokenizer) == model.config.image_token_id == pieces and len(tokenizer) == pieces + 1
    for table, original in ((model.get_input_embeddings().weight, state["model.embed_tokens.weight"]),
                            (model.lm_head.weight, state["lm_head.weight"])):
        assert table.shape[0] == rows and torch.equal(table.detach(), original.float())  # every row, as stored

    text_before, text_after = torch.tensor([1, 40, 41]), torch.tensor([50, 51])
    input_ids = torch.cat([text_before, torch.full((36,), pieces), text_after]).unsqueeze(0)
    pixel_values = torch.randn(1, 3, NEW_SIZE, NEW_SIZE)
    with torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values=pixel_values).logits[0]  # (41, rows)
    tower_state = {k.removeprefix(TOWER): v for k, v in state.items() if k.startswith(TOWER)}
    expected = reference_logits(state, tower_state, rows, text_before, text_after, pixel_values)
    torch.testing.assert_close(logits, expected, atol=2e-4, rtol=1e-4)

    hf_to_geochat(tmp_path / "hf", tmp_path / "geochat-back")
    restored = load_file(tmp_path / "geochat-back" / "model.safetensors")
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(restored[key], state[key]), key
    assert json.loads((tmp_path / "geochat-back" / "config.json").read_text())["vocab_size"] == rows


def test_a_token_without_a_row_is_refused(tmp_path, tokenizer_dir):
    _, rows = write_geochat_checkpoint(tmp_path / "geochat", tokenizer_dir, with_tower=True)
    (tmp_path / "geochat" / "added_tokens.json").write_text(json.dumps({"<im_patch>": rows}))  # one past the table
    with pytest.raises(ConversionError, match="model.embed_tokens.weight has .* rows but the tokenizer names"):
        geochat_to_hf(tmp_path / "geochat", tmp_path / "hf", image_size=NEW_SIZE)


def test_errors_name_the_missing_file_or_key(geochat_dir, tmp_path, capsys):
    src, _, _ = geochat_dir
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("x")
    with pytest.raises(ConversionError, match="taken already exists and is not empty"):
        geochat_to_hf(src, tmp_path / "taken", image_size=NEW_SIZE)
    removed = "model.layers.1.mlp.down_proj.weight"
    index = json.loads((src / "pytorch_model.bin.index.json").read_text())
    shard = src / index["weight_map"][removed]
    part = torch.load(shard, weights_only=True)
    del part[removed]
    torch.save(part, shard)
    with pytest.raises(ConversionError, match=f"key {removed} is missing"):
        geochat_to_hf(src, tmp_path / "a", image_size=NEW_SIZE)
    assert not (tmp_path / "a").exists() and not (tmp_path / "a.partial").exists()
    shard = src / "pytorch_model-00002-of-00002.bin"
    shard.unlink()
    capsys.readouterr()
    assert main(["geochat-to-hf", "--src", str(src), "--dst", str(tmp_path / "b")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    [message] = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert "pytorch_model-00002-of-00002.bin" in message and "missing" in message
    with pytest.raises(ConversionError, match="model_type 'geochat', not 'llava'"):
        hf_to_geochat(src, tmp_path / "c")
    (src / "config.json").unlink()
    with pytest.raises(ConversionError, match="config.json is missing"):
        geochat_to_hf(src, tmp_path / "c")


def test_hf_side_errors_name_the_missing_or_unexpected_key(geochat_dir, tmp_path):
    src, _, _ = geochat_dir
    geochat_to_hf(src, tmp_path / "hf", image_size=NEW_SIZE)
    path = tmp_path / "hf" / "model.safetensors"
    weights = load_file(path)
    removed = next(k for k in weights if k.endswith("norm.weight") and "language_model" in k)
    save_file({k: v for k, v in weights.items() if k != removed}, path, metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=f"key {removed} is missing"):
        hf_to_geochat(tmp_path / "hf", tmp_path / "back")
    save_file({**weights, "lm_head.lora_A.default.weight": torch.zeros(2, 2)}, path, metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="unexpected keys.*merge LoRA adapters"):
        hf_to_geochat(tmp_path / "hf", tmp_path / "back")


def test_hf_to_geochat_reads_a_save_pretrained_folder(tmp_path, tokenizer, tokenizer_dir):
    """transformers 5 writes LLaVA keys under other names on disk than its modules use: an exported student
    (save_pretrained) must still convert, with the LLM weights intact."""
    from safetensors.torch import load_file

    from kd_pipeline.config import ModelConfig
    from kd_pipeline.convert import hf_to_geochat
    from kd_pipeline.models import build_model
    from kd_pipeline.tokenizer import image_token_id as image_id_of, save_tokenizer

    image_id = image_id_of(tokenizer)
    model = build_model(ModelConfig(), vocab_size=len(tokenizer), image_token_id=image_id)
    model.save_pretrained(tmp_path / "hf")
    save_tokenizer(tokenizer, tmp_path / "hf", tokenizer_dir)
    out = hf_to_geochat(tmp_path / "hf", tmp_path / "student-geochat")
    weights = load_file(out / "model.safetensors")
    layer0 = model.model.language_model.layers[0].self_attn.q_proj.weight
    assert torch.equal(weights["model.layers.0.self_attn.q_proj.weight"], layer0)
    assert weights["model.embed_tokens.weight"].shape[0] == image_id  # GeoChat's <image> is not a row

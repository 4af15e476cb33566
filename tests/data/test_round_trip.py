"""synth -> shard -> verify -> load: the real data_prep output through the real loader, as training reads it."""

import json
import tarfile

from data_prep.__main__ import main as data_prep
from kd_pipeline.config import DataConfig
from kd_pipeline.data import build_train_loader
from kd_pipeline.prompts import IGNORE_INDEX
from kd_pipeline.tokenizer import image_token_id, load_tokenizer


def _train_keys(shards):
    manifest = json.loads((shards / "manifest.json").read_text())
    keys = set()
    for entry in manifest["shards"]:
        if entry["split"] == "train":
            with tarfile.open(shards / entry["name"]) as archive:
                keys |= {member.name.split(".", 1)[0] for member in archive}
    return keys, manifest


def test_synth_shard_verify_load_round_trip(synth_data):
    shards = synth_data["shards"]
    assert data_prep(["verify", str(shards)]) == 0
    keys, manifest = _train_keys(shards)
    assert len(keys) == manifest["splits"]["train"]["samples"]
    tokenizer = load_tokenizer(synth_data["tokenizer"])
    data_cfg = DataConfig(shards=str(shards), tokenizer=str(synth_data["tokenizer"]), max_length=256, num_workers=1,
                          shuffle_buffer=16)
    seen, batches = [], 0
    for rank in range(2):
        loader = build_train_loader(data_cfg, tokenizer=tokenizer, image_size=56, num_image_tokens=16,
                                    micro_batch_size=4, rank=rank, world_size=2, seed=0)
        stream = iter(loader)
        for _ in range(loader.steps_per_epoch):
            batch = next(stream)
            batches += 1
            # every image row has its 16 image tokens and pixel values; labels supervise something
            rows_with_image = int(batch["has_image"].sum())
            assert batch["pixel_values"].shape == (rows_with_image, 3, 56, 56)
            assert int((batch["input_ids"] == image_token_id(tokenizer)).sum()) == 16 * rows_with_image
            assert ((batch["labels"] != IGNORE_INDEX).sum(dim=1) > 0).all()
            seen += [key for key, repeat in zip(batch["keys"], batch["is_repeat"].tolist()) if not repeat]
    assert batches == 2 * loader.steps_per_epoch
    # One epoch over both ranks covers the split exactly once (only samples the loader reported skipping may miss).
    skipped = sum(loader.stats.get("skipped", {}).values()) if isinstance(loader.stats.get("skipped"), dict) else 0
    assert len(seen) == len(set(seen))
    missing = keys - set(seen)
    assert set(seen) <= keys and len(missing) <= skipped, (len(missing), skipped)

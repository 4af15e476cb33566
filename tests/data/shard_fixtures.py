"""Shard folders written by the loader tests themselves, following the shard contract (tars + manifest.json).

``write_shard_folder`` is the small stand-in for ``data_prep shard`` / ``data_prep pt`` until a round trip through
the real converters is added: members ``{key}.json`` and ``{key}.{ext}`` adjacent, a manifest with per-shard sample
counts, byte sizes and sha256. (A module of its own, not conftest.py: several test folders have a conftest.py,
and ``from conftest import`` would pick whichever pytest loaded last.)
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from kd_pipeline.config import DataConfig

IMAGE_SIZE = 28          # model input side in the tests (2 x 2 patches of 14)
NUM_IMAGE_TOKENS = 4


@dataclass
class RawSample:
    key: str
    record: dict | None              # the {key}.json payload (None: use json_bytes as is)
    image: bytes | None = None
    ext: str = "png"
    json_bytes: bytes | None = None  # overrides record (to write unparsable JSON)


def png_bytes(width: int, height: int, seed: int, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}.get(mode)
    shape = (height, width, channels) if channels else (height, width)
    image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def instruct_sample(index: int, *, with_image: bool = True, turns: int = 1) -> RawSample:
    key = f"s{index:05d}"
    conversations = []
    for turn in range(turns):
        question = f"What is in the picture {index} {turn}?"
        if turn == 0 and with_image:
            question += "\n<image>"
        conversations += [{"from": "human", "value": question},
                          {"from": "gpt", "value": f"A red ship near the harbour {index}."}]
    record = {"id": str(index), "image": f"img/{index}.png" if with_image else None,
              "image_ext": "png" if with_image else None, "width": 36 if with_image else None,
              "height": 30 if with_image else None, "task": "conversation" if with_image else "text-only",
              "conversations": conversations}
    image = png_bytes(36, 30, seed=index) if with_image else None
    return RawSample(key, record, image)


def pretrain_sample(index: int, *, with_image: bool = False) -> RawSample:
    record = {"id": str(index), "task": "pretrain", "text": f"A chat about the harbour {index} and a red ship."}
    if with_image:
        record.update(image=f"img/{index}.png", image_ext="png", width=30, height=30)
    return RawSample(f"p{index:05d}", record, png_bytes(30, 30, seed=index) if with_image else None)


def _add_member(archive: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0
    archive.addfile(info, io.BytesIO(payload))


def write_shard_folder(folder: Path, shards: dict[str, list[list[RawSample]]], kind: str = "instruct") -> Path:
    """Write ``{split: [[samples of shard 0], [samples of shard 1], ...]}`` as tars plus manifest.json."""
    folder.mkdir(parents=True, exist_ok=True)
    prefix = {"train": "train", "val": "val", "pt": "pt"}
    entries = []
    for split, shard_list in shards.items():
        for number, samples in enumerate(shard_list):
            name = f"{prefix[split]}-{number:06d}.tar"
            with tarfile.open(folder / name, "w") as archive:
                for sample in samples:
                    payload = sample.json_bytes if sample.json_bytes is not None else json.dumps(sample.record).encode()
                    _add_member(archive, f"{sample.key}.json", payload)
                    if sample.image is not None:
                        _add_member(archive, f"{sample.key}.{sample.ext}", sample.image)
            data = (folder / name).read_bytes()
            entries.append({"name": name, "split": split, "samples": len(samples), "bytes": len(data),
                            "sha256": hashlib.sha256(data).hexdigest()})
    splits = {split: {"samples": sum(e["samples"] for e in entries if e["split"] == split),
                      "shards": sum(1 for e in entries if e["split"] == split)} for split in shards}
    total = sum(e["samples"] for e in entries)
    manifest = {"format_version": 1, "kind": kind, "source": {"name": "tests", "size": 0, "sha256": ""}, "seed": 0,
                "val_fraction": 0.0, "max_image_pixels": 178_956_970,
                "totals": {"input": total, "written": total, "rejected": 0}, "splits": splits, "shards": entries,
                "task_kinds": {}, "reject_reasons": {}}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return folder


def even_train_shards(num_shards: int, per_shard: int, *, first_index: int = 0) -> list[list[RawSample]]:
    """Shards of equal size; every third sample is text-only."""
    return [[instruct_sample(first_index + shard * per_shard + i, with_image=(shard * per_shard + i) % 3 != 2)
             for i in range(per_shard)] for shard in range(num_shards)]


def data_config(folder: Path, *, num_workers: int = 2, shuffle_buffer: int = 8, pt_folder: Path | None = None,
                max_length: int = 2048, packing: bool = True) -> DataConfig:
    return DataConfig(shards=str(folder), pt_shards=str(pt_folder or ""), num_workers=num_workers,
                      shuffle_buffer=shuffle_buffer, max_length=max_length, packing=packing)

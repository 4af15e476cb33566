"""Benchmark of the training loader (kd_pipeline.data) against a GeoChat-style loader on the same data.

Both produce the same training inputs per sample — image decoded, padded to square with the CLIP mean colour,
resized to 504 px, normalised; conversation rendered, tokenized and labelled with GeoChat's ``preprocess_v1`` — so
the number measured is samples/s of decode + preprocess + tokenize with ONE DataLoader worker (per-worker rate):

- ours: ``build_train_loader`` over webdataset shards (tar bytes, shuffle buffer, our numpy CLIP preprocessing);
- GeoChat-style: one JSON list loaded up front plus an image folder, each item opened lazily from disk in
  ``__getitem__`` (LLaVA's ``LazySupervisedDataset``), preprocessed with transformers' ``CLIPImageProcessor`` (the PIL
  backend, as LLaVA calls it), torch ``Dataset`` + ``DataLoader``.

It also times the image preprocessing alone, in-process (ours vs CLIPImageProcessor), which is where the two differ
most. The data is made here: synthetic PNG images of varying aspect ratio (smooth fields plus noise, so they do not
compress to nothing), a GeoChat-style JSON list, and shards written per the shard contract. A tiny SentencePiece
tokenizer is trained on the fly (no download).

Runbook (from the repository root):
    .venv/bin/python bench/bench_loader.py --quick     # smoke run, under a minute on 2 cores
    .venv/bin/python bench/bench_loader.py             # -> bench/results/loader_cpu.json
The machine's other load changes both numbers; the ratio is the meaningful figure (both run back to back).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import platform
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from kd_pipeline.config import DataConfig
from kd_pipeline.data import build_train_loader
from kd_pipeline.data.collate import collate_right_padded
from kd_pipeline.data.images import PAD_COLOUR, pad_to_square, preprocess_image
from kd_pipeline.data.samples import EncodedItem
from kd_pipeline.prompts import encode_conversation
from kd_pipeline.tokenizer import image_token_id, load_tokenizer, train_tokenizer

logger = logging.getLogger("bench_loader")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
QUESTIONS = ["What is in the picture?", "[refer] Give me the location of <p> the plane </p>",
             "Classify the image. Answer the question using a single word or phrase."]
ANSWERS = ["A red ship near the harbour.", "{<10><20><30><40>|<45>}", "harbour"]


# ----------------------------------------------------------------------------------------------------- data


def synthetic_png(width: int, height: int, seed: int) -> bytes:
    """A smooth random field plus mild noise: compresses like a photo, not like flat colour or pure noise."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((width, height),
                                                                                    Image.Resampling.BICUBIC)
    noisy = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def make_records(count: int, source_side: int) -> list[tuple[dict, bytes]]:
    records = []
    for index in tqdm(range(count), desc="images", unit="img"):
        width = source_side
        height = int(source_side * (0.75 + 0.25 * (index % 3)))      # square and non-square images
        conversation = [{"from": "human", "value": f"<image>\n{QUESTIONS[index % 3]}"},
                        {"from": "gpt", "value": ANSWERS[index % 3]}]
        record = {"id": str(index), "image": f"img_{index:06d}.png", "conversations": conversation}
        records.append((record, synthetic_png(width, height, seed=index)))
    return records


def write_geochat_layout(folder: Path, records: list[tuple[dict, bytes]]) -> Path:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for record, image in records:
        (folder / "images" / record["image"]).write_bytes(image)
    json_path = folder / "instruct.json"
    json_path.write_text(json.dumps([record for record, _ in records]))
    return json_path


def _add_member(archive: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    archive.addfile(info, io.BytesIO(payload))


def write_shards(folder: Path, records: list[tuple[dict, bytes]], per_shard: int) -> Path:
    """The shard contract: {key}.json + {key}.png adjacent, manifest.json with counts, bytes and sha256."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for number, start in enumerate(range(0, len(records), per_shard)):
        name = f"train-{number:06d}.tar"
        chunk = records[start:start + per_shard]
        with tarfile.open(folder / name, "w") as archive:
            for index, (record, image) in enumerate(chunk, start=start):
                key = f"sample_{index:06d}"
                sample_json = {"id": record["id"], "image": record["image"], "image_ext": "png", "width": None,
                               "height": None, "task": "conversation", "conversations": record["conversations"]}
                _add_member(archive, f"{key}.json", json.dumps(sample_json).encode())
                _add_member(archive, f"{key}.png", image)
        data = (folder / name).read_bytes()
        entries.append({"name": name, "split": "train", "samples": len(chunk), "bytes": len(data),
                        "sha256": hashlib.sha256(data).hexdigest()})
    manifest = {"format_version": 1, "kind": "instruct", "source": {"name": "bench", "size": 0, "sha256": ""},
                "seed": 0, "val_fraction": 0.0, "max_image_pixels": 178_956_970,
                "totals": {"input": len(records), "written": len(records), "rejected": 0},
                "splits": {"train": {"samples": len(records), "shards": len(entries)}}, "shards": entries,
                "task_kinds": {}, "reject_reasons": {}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


# ----------------------------------------------------------------------------------------------------- GeoChat-style


class GeoChatStyleDataset(torch.utils.data.Dataset):
    """LLaVA's LazySupervisedDataset pattern: the JSON list in memory, each image opened from disk per item."""

    def __init__(self, json_path: Path, image_folder: Path, tokenizer, image_size: int, num_image_tokens: int):
        self.records = json.loads(json_path.read_text())
        self.image_folder = image_folder
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id(tokenizer)
        self.num_image_tokens = num_image_tokens
        self.processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                               crop_size={"height": image_size, "width": image_size})

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> EncodedItem:
        record = self.records[index]
        image = Image.open(self.image_folder / record["image"]).convert("RGB")
        image = pad_to_square(image, PAD_COLOUR)
        pixel_values = self.processor.preprocess(image, return_tensors="np")["pixel_values"][0]   # (3, S, S)
        encoded = encode_conversation(record["conversations"], self.tokenizer, image_token_id=self.image_token_id,
                                      num_image_tokens=self.num_image_tokens)
        return EncodedItem(record["id"], encoded.input_ids, encoded.labels, pixel_values)


# ----------------------------------------------------------------------------------------------------- timing


def time_batches(batches, total_samples: int, desc: str) -> float:
    """Samples/s over ``total_samples`` samples, timed from the first batch (worker start-up excluded for both)."""
    progress = tqdm(total=total_samples, desc=desc, unit="sample")
    start, first_size, seen = None, 0, 0
    for batch in batches:
        seen += len(batch["keys"])
        progress.update(len(batch["keys"]))
        if start is None:
            start, first_size = time.perf_counter(), len(batch["keys"])
        elif seen >= total_samples:
            break
    progress.close()
    if hasattr(batches, "close"):
        batches.close()   # our loader is endless: closing it stops its DataLoader workers
    return (seen - first_size) / (time.perf_counter() - start)


def time_preprocessing(records: list[tuple[dict, bytes]], image_size: int) -> dict:
    processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                      crop_size={"height": image_size, "width": image_size})
    sample = [image for _, image in records[:16]]
    start = time.perf_counter()
    for image in sample:
        preprocess_image(image, image_size=image_size, max_pixels=178_956_970)
    ours = len(sample) / (time.perf_counter() - start)
    start = time.perf_counter()
    for image in sample:
        opened = pad_to_square(Image.open(io.BytesIO(image)).convert("RGB"))
        processor.preprocess(opened, return_tensors="np")
    reference = len(sample) / (time.perf_counter() - start)
    return {"ours_images_per_s": round(ours, 2), "clip_image_processor_images_per_s": round(reference, 2),
            "ratio": round(ours / reference, 3)}


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as workdir:
        return run_in(Path(workdir), args)


def run_in(workdir: Path, args: argparse.Namespace) -> dict:
    texts = QUESTIONS + ANSWERS + ["A chat between a curious user and an artificial intelligence assistant. The "
                                   "assistant gives helpful, detailed, and polite answers to the user's questions."]
    tokenizer = load_tokenizer(train_tokenizer(texts * 30, workdir / "tokenizer", vocab_size=400))
    records = make_records(args.samples, args.source_side)
    json_path = write_geochat_layout(workdir / "geochat", records)
    shard_folder = write_shards(workdir / "shards", records, per_shard=max(1, args.samples // 8))
    num_image_tokens = (args.image_size // 14) ** 2

    config = DataConfig(shards=str(shard_folder), num_workers=1, shuffle_buffer=64)
    ours_loader = build_train_loader(config, tokenizer=tokenizer, image_size=args.image_size,
                                     num_image_tokens=num_image_tokens, micro_batch_size=args.batch_size, rank=0,
                                     world_size=1, seed=0)
    ours = time_batches(iter(ours_loader), args.samples, "ours")

    dataset = GeoChatStyleDataset(json_path, workdir / "geochat" / "images", tokenizer, args.image_size,
                                  num_image_tokens)
    collate = lambda items: collate_right_padded(items, pad_id=tokenizer.pad_token_id,  # noqa: E731
                                                 image_size=args.image_size)
    geochat_loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=1,
                                                 collate_fn=collate)
    geochat = time_batches(iter(geochat_loader), args.samples, "geochat-style")

    return {
        "what": "samples/s per DataLoader worker: decode + pad + resize + normalise + render + tokenize + label",
        "image_size": args.image_size, "source_side": args.source_side, "samples": args.samples,
        "batch_size": args.batch_size, "workers": 1, "quick": args.quick,
        "ours_samples_per_s": round(ours, 2), "geochat_style_samples_per_s": round(geochat, 2),
        "ratio_ours_over_geochat_style": round(ours / geochat, 3),
        "preprocess_only": time_preprocessing(records, args.image_size),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "load_average_1min": os.getloadavg()[0]},
    }


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few samples, smaller source images (smoke run)")
    parser.add_argument("--samples", type=int, default=None, help="samples per loader (default 256, quick 48)")
    parser.add_argument("--source-side", type=int, default=None, help="source image width (default 640, quick 320)")
    parser.add_argument("--image-size", type=int, default=504, help="model input side (GeoChat: 504)")
    parser.add_argument("--batch-size", type=int, default=4, help="micro-batch size of both loaders")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "loader_cpu.json", help="JSON result path")
    args = parser.parse_args(argv)
    args.samples = args.samples or (48 if args.quick else 256)
    args.source_side = args.source_side or (320 if args.quick else 640)
    return args


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_arguments(argv)
    result = run(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"ours          {result['ours_samples_per_s']:8.2f} samples/s per worker")
    print(f"geochat-style {result['geochat_style_samples_per_s']:8.2f} samples/s per worker")
    print(f"ratio         {result['ratio_ours_over_geochat_style']:8.3f}   (-> {args.output})")
    return result


if __name__ == "__main__":
    main()

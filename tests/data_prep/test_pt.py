"""``python -m data_prep pt``: text documents and image-caption pairs -> pt shards."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from tests.data_prep.conftest import write_image
from data_prep import pt


def samples_of(out: Path) -> dict[str, dict]:
    """key -> {extension: payload} over all shards of a pt directory."""
    samples: dict[str, dict] = {}
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest["shards"]:
        with tarfile.open(out / entry["name"]) as tar:
            for member in tar:
                key, _, extension = member.name.partition(".")
                samples.setdefault(key, {})[extension] = tar.extractfile(member).read()
    return samples


def test_text_and_captions_become_pretrain_samples(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("First paragraph,\nstill the first.\n\n\n  Second paragraph.\n\n   \nThird — ünïcode.\n")
    lines = tmp_path / "lines.jsonl"
    lines.write_text(json.dumps({"text": "json doc", "id": "j1"}) + "\n" + "{oops\n"
                     + json.dumps({"text": "   "}) + "\n" + json.dumps({"text": "dup", "id": "j1"}) + "\n")
    images = tmp_path / "images"
    cat_bytes = write_image(images / "cat.png", size=(20, 10))
    dog_bytes = write_image(images / "sub/dog.jpg", image_format="JPEG", seed=3)
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps([
        {"id": "c1", "image": "cat.png", "caption": "a cat"},
        {"id": "c2", "image": "sub/dog.jpg", "conversations": [
            {"from": "human", "value": "<image>\nRender a short description."},
            {"from": "gpt", "value": "a dog"}]},
        {"id": "c3", "image": "absent.png", "caption": "nothing"},
        {"id": "c4", "image": "cat.png"},
    ]))
    out = tmp_path / "pt"
    exit_code = pt.main(["--text", str(plain), str(lines), "--text-unit", "paragraph", "--captions", str(captions),
                         "--images", str(images), "--out", str(out), "--workers", "2", "--max-shard-samples", "3",
                         "--max-reject-fraction", "1"])
    assert exit_code == 0

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "pretrain"
    assert [source["name"] for source in manifest["source"]] == ["plain.txt", "lines.jsonl", "captions.json"]
    assert manifest["totals"] == {"input": 11, "written": 6, "rejected": 5}
    assert manifest["splits"]["pt"]["samples"] == 6 and set(manifest["splits"]) == {"pt"}
    assert all(entry["name"].startswith("pt-") for entry in manifest["shards"])
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    # indices: 0-2 plain paragraphs, 3-6 jsonl lines, 7-10 captions
    assert [(reject["index"], reject["reason"]) for reject in rejects] == [
        (4, "malformed_record"), (5, "malformed_record"), (6, "duplicate_id"), (9, "missing_image"),
        (10, "malformed_record")]

    samples = samples_of(out)
    texts = {key: json.loads(members["json"]) for key, members in samples.items()}
    assert texts["000000000"] == {"id": None, "task": "pretrain", "text": "First paragraph,\nstill the first."}
    assert texts["000000002"]["text"] == "Third — ünïcode."
    assert texts["000000003"] == {"id": "j1", "task": "pretrain", "text": "json doc"}
    assert texts["000000007"] == {"id": "c1", "task": "pretrain", "text": "a cat", "image": "cat.png",
                                  "image_ext": "png", "width": 20, "height": 10}
    assert samples["000000007"]["png"] == cat_bytes
    assert texts["000000008"]["text"] == "a dog" and samples["000000008"]["jpg"] == dog_bytes


def test_one_document_per_line_by_default_and_argument_errors(tmp_path, capsys):
    plain = tmp_path / "plain.txt"
    plain.write_text("one\ntwo\n\nthree\n")
    out = tmp_path / "pt"
    assert pt.main(["--text", str(plain), "--out", str(out), "--workers", "1"]) == 0
    assert json.loads((out / "manifest.json").read_text())["totals"]["written"] == 3
    assert pt.main(["--text", str(tmp_path / "absent.txt"), "--out", str(tmp_path / "x")]) == 2
    assert "absent.txt" in capsys.readouterr().err

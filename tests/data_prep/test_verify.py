"""``python -m data_prep verify`` finds damaged, missing and unlisted shards and names each one."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from tests.data_prep.conftest import record, write_image
from data_prep import __main__ as data_prep_main
from data_prep import pt, shard, verify


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    records = []
    for index in range(8):
        write_image(images / f"{index}.png", size=(24, 24), seed=index)
        records.append(record("<image>\nWhat is it?", f"thing {index}", f"{index}.png", f"id{index}"))
    records.append(record("text only", "answer", None, "text"))
    instruct = tmp_path / "instruct.json"
    instruct.write_text(json.dumps(records))
    out = tmp_path / "shards"
    assert shard.main(["--instruct", str(instruct), "--images", str(images), "--out", str(out), "--workers", "1",
                       "--max-shard-samples", "2", "--val-fraction", "0"]) == 0
    return out


def problems_by_shard(capsys) -> dict[str, list[str]]:
    problems: dict[str, list[str]] = {}
    for line in capsys.readouterr().out.splitlines():
        name, _, problem = line.partition(": ")
        problems.setdefault(name, []).append(problem)
    return problems


def test_clean_directory_passes(shard_dir, capsys):
    assert verify.main([str(shard_dir)]) == 0
    assert capsys.readouterr().out.strip() == "OK: 5 shards, 9 samples"


def test_each_kind_of_damage_is_reported_by_name(shard_dir, capsys):
    truncated = shard_dir / "train-000000.tar"
    truncated.write_bytes(truncated.read_bytes()[:1500])  # cuts into the first image's data
    flipped = shard_dir / "train-000001.tar"
    flipped_bytes = bytearray(flipped.read_bytes())
    flipped_bytes[1100] ^= 0x01  # inside the first image's PNG data
    flipped.write_bytes(bytes(flipped_bytes))
    (shard_dir / "train-000002.tar").unlink()
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    manifest["shards"][3]["samples"] += 1
    (shard_dir / "manifest.json").write_text(json.dumps(manifest))
    (shard_dir / "train-000077.tar").write_bytes(b"")

    assert verify.main([str(shard_dir), "--workers", "2"]) == 1
    problems = problems_by_shard(capsys)
    assert any("truncated or corrupt tar" in problem for problem in problems["train-000000.tar"])
    assert any("size 1500 bytes" in problem for problem in problems["train-000000.tar"])
    assert problems["train-000001.tar"][0] == "sha256 differs from manifest (changed bytes)"
    assert problems["train-000002.tar"] == ["missing shard (listed in manifest.json, no such file)"]
    assert any("count mismatch: 2 samples, manifest says 3" in problem for problem in problems["train-000003.tar"])
    assert problems["train-000077.tar"] == ["shard not listed in manifest.json"]
    assert "train-000004.tar" not in problems


def test_content_checks_catch_a_rewritten_shard_with_matching_manifest(shard_dir, capsys):
    # A shard rebuilt with a broken json and a wrong image extension, manifest updated to match its new hash:
    # only the content checks can notice.
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    for entry in manifest["shards"]:
        with tarfile.open(shard_dir / entry["name"]) as tar:
            members = [(member, tar.extractfile(member).read()) for member in tar]
        if sum(member.name.endswith(".png") for member, _ in members) == 2:
            break
    path = shard_dir / entry["name"]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for position, (member, payload) in enumerate(members):
            if position == 0:
                payload = payload[:-5]
            if position == 3:
                member.name = member.name.replace(".png", ".jpg")
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
    entry["bytes"] = path.stat().st_size
    entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (shard_dir / "manifest.json").write_text(json.dumps(manifest))

    assert verify.main([str(shard_dir)]) == 1
    problems = problems_by_shard(capsys)
    assert list(problems) == [path.name]
    assert len(problems[path.name]) == 2
    assert ".json does not decode" in problems[path.name][0]
    assert "image member(s) ['jpg'], .json says 'png'" in problems[path.name][1]


def test_missing_manifest_exits_2(tmp_path, capsys):
    assert verify.main([str(tmp_path)]) == 2
    assert "manifest.json does not exist" in capsys.readouterr().err
    assert data_prep_main.main(["verify", str(tmp_path)]) == 2


def test_verify_works_for_pt_directories(tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("first document\n\nsecond document\nwith two lines\n")
    out = tmp_path / "pt"
    assert pt.main(["--text", str(text), "--out", str(out), "--workers", "1"]) == 0
    capsys.readouterr()
    assert verify.main([str(out)]) == 0
    (out / "pt-000000.tar").write_bytes((out / "pt-000000.tar").read_bytes()[:700])
    assert verify.main([str(out)]) == 1
    assert "pt-000000.tar" in problems_by_shard(capsys)

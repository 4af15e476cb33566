"""End-to-end tests of ``python -m data_prep shard`` run in-process on tiny inputs."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.data_prep.conftest import record, write_image
from data_prep import shard
from data_prep.sharding import FAIL_AFTER_SHARDS_ENV, PROGRESS_DIR


def run_shard(instruct: Path, images: Path, out: Path, *extra: str) -> int:
    return shard.main(["--instruct", str(instruct), "--images", str(images), "--out", str(out),
                       "--max-image-pixels", "3000", "--max-reject-fraction", "1.0", *extra])


def read_tar(path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path) as tar:
        return [(member, tar.extractfile(member).read()) for member in tar]


def output_files(out: Path) -> dict[str, bytes]:
    """Every file of an output directory except the progress records."""
    return {str(path.relative_to(out)): path.read_bytes() for path in sorted(out.rglob("*"))
            if path.is_file() and PROGRESS_DIR not in path.parts}


def test_every_record_is_written_or_rejected_with_its_reason(geochat_inputs, tmp_path):
    instruct, images, records, expected = geochat_inputs
    out = tmp_path / "out"
    assert run_shard(instruct, images, out, "--workers", "1", "--max-shard-samples", "3") == 0

    manifest = json.loads((out / "manifest.json").read_text())
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert {reject["index"]: reject["reason"] for reject in rejects} == {
        index: reason for index, reason in expected.items() if reason is not None}
    assert [reject["index"] for reject in rejects] == sorted(reject["index"] for reject in rejects)
    assert rejects[0]["id"] == records[rejects[0]["index"]].get("id") and all(r["detail"] for r in rejects)

    written_indices = sorted(index for index, reason in expected.items() if reason is None)
    totals = manifest["totals"]
    assert totals == {"input": len(records), "written": len(written_indices), "rejected": len(rejects)}
    assert totals["written"] + totals["rejected"] == totals["input"]
    assert manifest["reject_reasons"] == {
        reason: list(expected.values()).count(reason) for reason in sorted(set(expected.values()) - {None})}
    assert manifest["task_kinds"] == {"grounding": 1, "refer": 1, "identify": 1, "vqa": 1, "classification": 1,
                                      "conversation": 4, "text-only": 1}
    assert manifest["source"]["name"] == "instruct.json" and manifest["source"]["size"] == instruct.stat().st_size

    # Shards: names, per-shard counts and hashes as listed; members adjacent, json first, image bytes unchanged.
    seen_indices = []
    for entry in manifest["shards"]:
        members = read_tar(out / entry["name"])
        assert entry["bytes"] == (out / entry["name"]).stat().st_size
        assert sum(member.name.endswith(".json") for member, _ in members) == entry["samples"] <= 3
        position = 0
        while position < len(members):
            json_member, json_payload = members[position]
            key = json_member.name.removesuffix(".json")
            assert json_member.name.endswith(".json") and "." not in key and not key.startswith("_")
            meta = json.loads(json_payload)
            index = int(key)
            seen_indices.append(index)
            source_record = records[index]
            assert meta["id"] == source_record.get("id") and meta["image"] == source_record.get("image")
            assert meta["conversations"] == source_record["conversations"]
            position += 1
            if meta["image"] is not None:
                image_member, image_payload = members[position]
                assert image_member.name == f"{key}.{meta['image_ext']}"
                assert image_payload == (images / meta["image"]).read_bytes()
                position += 1
        assert all((member.mtime, member.uid, member.gid, member.uname, member.gname, member.mode)
                   == (0, 0, 0, "", "", 0o444) for member, _ in members)
    assert sorted(seen_indices) == written_indices
    assert {json.loads(p)["image_ext"] for e in manifest["shards"] for m, p in read_tar(out / e["name"])
            if m.name.endswith(".json")} == {None, "png", "jpg", "tif", "webp", "gif", "bmp"}


def test_split_and_shard_sizes_follow_the_arguments(tmp_path):
    images = tmp_path / "images"
    records = []
    for index in range(40):
        write_image(images / f"{index}.png", size=(16, 16), seed=index)
        records.append(record("<image>\nWhat is it?", f"thing {index}", f"{index}.png", f"id{index}"))
    instruct = tmp_path / "instruct.jsonl"
    instruct.write_text("".join(json.dumps(item) + "\n" for item in records))
    out = tmp_path / "out"
    # each sample takes about 2.5 KB in the tar: a 0.012 MiB (~12.6 KB) cap gives at most 5 samples per shard
    assert run_shard(instruct, images, out, "--workers", "1", "--val-fraction", "0.25", "--max-shard-mb", "0.012") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["val"]["samples"] == 10 and manifest["splits"]["train"]["samples"] == 30
    for split in ("train", "val"):
        names = [entry["name"] for entry in manifest["shards"] if entry["split"] == split]
        assert names == [f"{split}-{number:06d}.tar" for number in range(len(names))]
        assert len(names) == manifest["splits"][split]["shards"] >= 2
    assert max(entry["samples"] for entry in manifest["shards"]) <= 5
    assert max(entry["bytes"] for entry in manifest["shards"]) <= 0.012 * 2**20 + 10240  # + tar end padding


def test_worker_count_does_not_change_the_output(geochat_inputs, tmp_path):
    instruct, images, _, _ = geochat_inputs
    single, double = tmp_path / "one", tmp_path / "two"
    assert run_shard(instruct, images, single, "--workers", "1", "--max-shard-samples", "2") == 0
    assert run_shard(instruct, images, double, "--workers", "2", "--max-shard-samples", "2") == 0
    assert output_files(single) == output_files(double)
    assert len([name for name in output_files(single) if name.endswith(".tar")]) >= 4


def test_seed_changes_the_assignment(geochat_inputs, tmp_path):
    instruct, images, _, _ = geochat_inputs
    assert run_shard(instruct, images, tmp_path / "a", "--workers", "1", "--max-shard-samples", "2") == 0
    assert run_shard(instruct, images, tmp_path / "b", "--workers", "1", "--max-shard-samples", "2", "--seed", "7") == 0
    assert output_files(tmp_path / "a")["train-000000.tar"] != output_files(tmp_path / "b")["train-000000.tar"]


def test_interrupted_run_resumes_to_identical_output(geochat_inputs, tmp_path, monkeypatch):
    instruct, images, _, _ = geochat_inputs
    clean, interrupted = tmp_path / "clean", tmp_path / "interrupted"
    assert run_shard(instruct, images, clean, "--workers", "1", "--max-shard-samples", "2") == 0

    monkeypatch.setenv(FAIL_AFTER_SHARDS_ENV, "2")
    with pytest.raises(RuntimeError, match="simulated interruption"):
        run_shard(instruct, images, interrupted, "--workers", "1", "--max-shard-samples", "2")
    assert not (interrupted / "manifest.json").exists()
    finished = sorted(path.name for path in interrupted.glob("*.tar"))
    assert len(finished) == 2
    finished_mtimes = {name: (interrupted / name).stat().st_mtime_ns for name in finished}
    (interrupted / "train-000004.tar.tmp").write_bytes(b"half a shard")  # as a killed writer leaves it
    (interrupted / "train-000099.tar").write_bytes(b"not in the plan")
    monkeypatch.delenv(FAIL_AFTER_SHARDS_ENV)

    assert run_shard(instruct, images, interrupted, "--workers", "2", "--max-shard-samples", "2") == 2  # no --resume
    assert run_shard(instruct, images, interrupted, "--workers", "2", "--max-shard-samples", "2", "--resume") == 0
    assert output_files(interrupted) == output_files(clean)
    assert {name: (interrupted / name).stat().st_mtime_ns for name in finished} == finished_mtimes  # kept, not redone


def test_resume_rewrites_a_damaged_shard(geochat_inputs, tmp_path):
    instruct, images, _, _ = geochat_inputs
    out = tmp_path / "out"
    assert run_shard(instruct, images, out, "--workers", "1", "--max-shard-samples", "2") == 0
    expected = output_files(out)
    damaged = bytearray((out / "train-000001.tar").read_bytes())
    damaged[700] ^= 0xFF
    (out / "train-000001.tar").write_bytes(bytes(damaged))
    (out / "train-000002.tar").unlink()
    assert run_shard(instruct, images, out, "--workers", "1", "--max-shard-samples", "2", "--resume") == 0
    assert output_files(out) == expected


def test_input_errors_exit_2_with_one_line(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    broken = tmp_path / "broken.json"
    broken.write_text('[{"conversations": [}')
    single_object = tmp_path / "object.json"
    single_object.write_text('{\n  "conversations": []\n}\n')
    for instruct in (tmp_path / "absent.json", broken, single_object):
        assert run_shard(instruct, images, tmp_path / "out") == 2
        error_lines = capsys.readouterr().err.strip().splitlines()
        assert len(error_lines) == 1 and error_lines[0].startswith("error: ") and instruct.name in error_lines[0]
    assert run_shard(broken, tmp_path / "no_images", tmp_path / "out") == 2


def test_jsonl_bad_lines_are_rejected_and_reject_fraction_sets_exit_code(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    instruct = tmp_path / "instruct.jsonl"
    good = json.dumps(record("hello", "world"))
    instruct.write_text(f"{good}\n\n{{broken\n{good}\n")
    out = tmp_path / "out"
    exit_code = shard.main(["--instruct", str(instruct), "--images", str(images), "--out", str(out),
                            "--workers", "1", "--val-fraction", "0", "--max-reject-fraction", "0.2"])
    assert exit_code == 1 and "exceeds --max-reject-fraction" in capsys.readouterr().err
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(reject["index"], reject["reason"]) for reject in rejects] == [(1, "malformed_record")]
    assert "line 3" in rejects[0]["detail"]
    assert json.loads((out / "manifest.json").read_text())["totals"] == {"input": 3, "written": 2, "rejected": 1}


def test_shards_are_read_by_webdataset_and_hf_datasets(tmp_path):
    # datasets' webdataset builder infers one schema from the first samples, so this set is homogeneous (all PNG).
    import datasets
    import webdataset

    images = tmp_path / "images"
    records = []
    for index in range(12):
        write_image(images / f"im{index}.png", size=(8, 8), seed=index)
        records.append(record("<image>\nWhat is it?", f"thing {index}", f"im{index}.png", f"id.{index}"))
    instruct = tmp_path / "instruct.json"
    instruct.write_text(json.dumps(records))
    out = tmp_path / "out"
    assert run_shard(instruct, images, out, "--workers", "1", "--max-shard-samples", "5") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    shard_paths = [str(out / entry["name"]) for entry in manifest["shards"] if entry["split"] == "train"]
    expected_keys = {f"{index:09d}" for index in range(12)}

    loaded = datasets.load_dataset("webdataset", data_files={"train": shard_paths}, split="train",
                                   cache_dir=str(tmp_path / "hf_cache"))
    assert set(loaded["__key__"]) == expected_keys
    first = loaded[0]
    assert first["json"]["id"] == records[int(first["__key__"])]["id"]
    assert first["png"].size == (8, 8)

    web_samples = list(webdataset.WebDataset(shard_paths, shardshuffle=False, empty_check=False))
    assert {sample["__key__"] for sample in web_samples} == expected_keys
    for sample in web_samples:
        assert sample["png"] == (images / f"im{int(sample['__key__'])}.png").read_bytes()


def test_real_command_line_reports_a_missing_file_without_traceback(tmp_path):
    (tmp_path / "images").mkdir()
    completed = subprocess.run(
        [sys.executable, "-m", "data_prep", "shard", "--instruct", str(tmp_path / "absent.json"),
         "--images", str(tmp_path / "images"), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=Path(shard.__file__).parents[1], timeout=120,
    )
    assert completed.returncode == 2
    expected_line = f"error: instruct file '{tmp_path / 'absent.json'}' does not exist"
    assert completed.stderr.strip().splitlines() == [expected_line]


def test_stale_cleanup_spares_another_tasks_in_flight_progress_record(tmp_path):
    """Array tasks share .progress/: a record another task is writing (write_atomic's ".NAME.tmp<pid>") stays;
    one of this task's own shards, or of no planned shard, is removed."""
    from types import SimpleNamespace

    from data_prep.sharding import PROGRESS_DIR, remove_stale_outputs

    progress = tmp_path / PROGRESS_DIR
    progress.mkdir()
    others = progress / ".train-000006.tar.json.tmp4242"
    own = progress / ".train-000001.tar.json.tmp4243"
    unplanned = progress / ".train-000099.tar.json.tmp4244"
    for path in (others, own, unplanned):
        path.write_text("{}")
    remove_stale_outputs(str(tmp_path), [SimpleNamespace(name="train-000001.tar")], ("train",),
                         planned_names={"train-000001.tar", "train-000006.tar"})
    assert others.exists() and not own.exists() and not unplanned.exists()


def test_the_in_flight_pattern_matches_what_write_atomic_creates(tmp_path, monkeypatch):
    """The stale-output cleanup recognises write_atomic's temporary by TEMPORARY_NAME: the two must not drift."""
    from kd_pipeline import fileio

    seen = []
    real_replace = fileio.os.replace
    monkeypatch.setattr(fileio.os, "replace", lambda source, target: (seen.append(Path(source).name),
                                                                       real_replace(source, target)))
    fileio.write_atomic(tmp_path / "train-000003.tar.json", "{}")
    (temporary,) = seen
    assert fileio.TEMPORARY_NAME.fullmatch(temporary).group(1) == "train-000003.tar.json"


def test_prompts_only_stores_no_answer_feeds_stage_2_and_is_refused_by_the_supervised_loaders(tmp_path, tokenizer):
    """``--prompts-only``: records may end with a question; a trailing answer is cut before anything is written
    (it is in no tar); the manifest says ``prompts``; stage 2's prompt loader reads the folder and the supervised
    loaders refuse it with a message that says what it is for."""
    from kd_pipeline.config import DataConfig
    from kd_pipeline.data import build_prompt_loader, build_train_loader
    from kd_pipeline.data.manifest import ManifestError

    images = tmp_path / "images"
    records = []
    for index in range(8):
        write_image(images / f"im{index}.png", size=(8, 8), seed=index)
        if index % 2:  # a labelled record: its answer must not reach the shards
            records.append(record("<image>\nWhat is it?", f"SECRET{index}", f"im{index}.png", f"id.{index}"))
        else:  # a bare prompt
            records.append({"id": f"id.{index}", "image": f"im{index}.png",
                            "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}]})
    instruct = tmp_path / "prompts.json"
    instruct.write_text(json.dumps(records))
    assert run_shard(instruct, images, tmp_path / "labelled", "--workers", "1") == 0
    assert json.loads((tmp_path / "labelled" / "rejects.jsonl").read_text().splitlines()[0])["detail"].endswith(
        "(shard prompts for stage 2 with --prompts-only)")
    out = tmp_path / "prompts"
    assert run_shard(instruct, images, out, "--workers", "1", "--prompts-only", "--val-fraction", "0") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "prompts" and manifest["totals"]["written"] == 8
    stored = b"".join(payload for tar in sorted(out.glob("*.tar")) for _, payload in read_tar(tar))
    assert b"What is it?" in stored and b"SECRET" not in stored and b'"gpt"' not in stored
    from data_prep import verify
    assert verify.main([str(out)]) == 0

    data = DataConfig(shards=str(out), num_workers=0, shuffle_buffer=4)
    loader_args = dict(tokenizer=tokenizer, image_size=28, num_image_tokens=4, micro_batch_size=4, rank=0,
                       world_size=1, seed=0)
    batches = list(itertools.islice(iter(build_prompt_loader(data, **loader_args)), 2))
    assert sum(len(batch["keys"]) for batch in batches) == 8
    with pytest.raises(ManifestError, match=r"prompts without answers .*use this folder as stage 2's data\.shards"):
        build_train_loader(data, **loader_args)

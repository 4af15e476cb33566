"""`python -m kd_pipeline.eval run` on a tiny LLaVA and a synthetic evaluation set (data_prep synth + bench).

Checks: batched left-padded greedy answers equal an independent one-question-at-a-time greedy loop (EOS stopping
per row included); the end-to-end run writes answers, results.json, report.md and figures; an interrupted run
(a --limit run whose last answer line is then cut short) resumes answering exactly the missing questions and ends
with the same answers as an uninterrupted run; rank part files merge into the same answers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from data_prep import bench, synth
from kd_pipeline.config import ModelConfig
from kd_pipeline.eval import run
from kd_pipeline.eval.__main__ import main as eval_cli
from kd_pipeline.eval.generate import (decode_answer, generate_answers, left_pad, load_eval_model, load_pixels)
from kd_pipeline.models import build_model
from kd_pipeline.prompts import tokenize_with_image
from kd_pipeline.tokenizer import EOS_ID, image_token_id, save_tokenizer
from tests.engine.launch import free_port

LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                   "helpful, detailed, and polite answers to the human's questions.")
BENCH_SOURCES = {"aid": "scene", "ucmerced": "scene", "lrben": "vqa", "hrben": "vqa", "referring": "referring",
                 "region_captioning": "region_captioning"}
QUESTIONS_PER_TASK = 5
TOTAL_QUESTIONS = QUESTIONS_PER_TASK * len(BENCH_SOURCES)


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Six normalized sets written by the real CLIs: data_prep synth, then data_prep bench per task."""
    world = tmp_path_factory.mktemp("world")
    assert synth.main(["--out", str(world), "--num", "2", "--bench-num", str(QUESTIONS_PER_TASK), "--pt-lines", "1",
                       "--image-size", "32", "--seed", "5"]) == 0
    eval_dir = tmp_path_factory.mktemp("eval_set")
    for task, source in BENCH_SOURCES.items():
        assert bench.main(["--task", task, "--questions", str(world / "bench" / f"{source}.jsonl"),
                           "--images", str(world / "bench" / "images"), "--out", str(eval_dir)]) == 0
    return eval_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir, tokenizer) -> Path:
    torch.manual_seed(0)
    model = build_model(ModelConfig(attn_implementation="sdpa"), vocab_size=len(tokenizer),
                        image_token_id=image_token_id(tokenizer))
    folder = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(str(folder))
    save_tokenizer(tokenizer, folder, source_dir=tokenizer_dir)
    return folder


def count_generated_rows(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the questions sent to the model's generate (one entry per call: its batch size)."""
    calls: list[int] = []
    original = LlavaForConditionalGeneration.generate

    def counting_generate(self, *args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LlavaForConditionalGeneration, "generate", counting_generate)
    return calls


@pytest.fixture
def generated_rows(monkeypatch) -> list[int]:
    return count_generated_rows(monkeypatch)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model's ops take microseconds: with several threads on a shared CPU they wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_eval(model_dir: Path, data_dir: Path, out_dir: Path, *extra: str) -> int:
    """The real command line: ``python -m kd_pipeline.eval run ...``."""
    return eval_cli(["run", "--model", f"tiny={model_dir}", "--data", str(data_dir), "--out", str(out_dir),
                     "--batch-size", "3", "--max-new-tokens", "4", "--no-meteor", "--device", "cpu", "--no-latency",
                     *extra])


@pytest.fixture(scope="module")
def complete_run(model_dir, data_dir, tmp_path_factory) -> tuple[Path, list[int]]:
    """(output folder, generate batch sizes) of one uninterrupted run over all six tasks."""
    out_dir = tmp_path_factory.mktemp("complete_run")
    with pytest.MonkeyPatch.context() as monkeypatch:
        generated = count_generated_rows(monkeypatch)
        assert run_eval(model_dir, data_dir, out_dir) == 0
    return out_dir, generated


def test_efficiency_row_counts_the_model_itself(complete_run, model_dir):
    """Table 8 for the evaluated model: parameters against an independent count of the saved model."""
    from transformers import LlavaForConditionalGeneration

    out_dir, _ = complete_run
    efficiency = json.loads((out_dir / "results.json").read_text())["tiny"]["efficiency"]
    model = LlavaForConditionalGeneration.from_pretrained(model_dir)
    assert efficiency["params_total"] == sum(p.numel() for p in model.parameters())
    assert 0 < efficiency["params_paper"] < efficiency["params_total"]
    assert efficiency["flops_forward_matmul"] > 2 * efficiency["params_paper"]  # >= 2 FLOPs/param/token
    assert "latency_s" not in efficiency  # --no-latency


# ----------------------------------------------------------------------------------------------------- pieces


def test_left_pad_puts_tokens_right_and_masks_padding():
    input_ids, attention_mask = left_pad([[5, 6, 7], [8]])
    assert input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_split_for_rank_is_round_robin_and_covers_everything():
    items = list(range(11))
    shares = [run.split_for_rank(items, rank, 3) for rank in range(3)]
    assert shares == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    assert sorted(item for share in shares for item in share) == items
    with pytest.raises(ValueError, match="outside a world"):
        run.split_for_rank(items, 3, 3)


def test_model_names_come_from_the_folder_or_name_equals():
    assert run.parse_model_spec("runs/kd/best_hf/") == ("best_hf", Path("runs/kd/best_hf/"))
    assert run.parse_model_spec("student=runs/a=b") == ("student", Path("runs/a=b"))
    with pytest.raises(run.RunInputError, match="model name"):
        run.parse_model_spec("bad name=runs/x")


def test_read_answers_ignores_a_cut_last_line_and_rejects_damage_elsewhere(tmp_path):
    path = tmp_path / "aid.jsonl"
    path.write_text('{"question_id": 1, "answer": "a"}\n{"question_id": 2, "ans', encoding="utf-8")
    records, complete_length = run.read_answers(path)
    assert [record["question_id"] for record in records] == [1]
    run.cut_partial_line(path)
    assert path.read_text(encoding="utf-8") == '{"question_id": 1, "answer": "a"}\n'
    assert complete_length == path.stat().st_size
    path.write_text('{"question_id": 1\n{"question_id": 2}\n', encoding="utf-8")
    with pytest.raises(run.RunInputError, match="aid.jsonl:1 is not valid JSON"):
        run.read_answers(path)


def test_merge_keeps_question_order_first_answers_and_foreign_ids(tmp_path):
    (tmp_path / "vqa.jsonl").write_text('{"question_id": 3, "answer": "old"}\n{"question_id": 99, "answer": "x"}\n')
    (tmp_path / "vqa.part0.jsonl").write_text('{"question_id": 1, "answer": "one"}\n'
                                              '{"question_id": 3, "answer": "dup"}\n')
    (tmp_path / "vqa.part1.jsonl").write_text('{"question_id": 2, "answer": "two"}\n{"question_id": 4, "an')
    questions = [{"question_id": question_id} for question_id in (1, 2, 3, 4)]
    assert run.answered_ids(tmp_path, "vqa") == {"1", "2", "3", "99"}
    merged = run.merge_answers(tmp_path, "vqa", questions)
    assert [(record["question_id"], record["answer"]) for record in merged] == [(1, "one"), (2, "two"), (3, "old")]
    assert [record["question_id"] for record in read_lines(tmp_path / "vqa.jsonl")] == [1, 2, 3, 99]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["vqa.jsonl"]


# ----------------------------------------------------------------------------------------------------- batching


def reference_prompt_ids(prompt: str, tokenizer, image_tokens: int) -> list[int]:
    """The llava_v1 prompt written out literally (geochat.md), the image id repeated by hand."""
    image_id = image_token_id(tokenizer)
    text = f"{LLAVA_V1_SYSTEM} USER: <image>\n{prompt} ASSISTANT:"
    ids = tokenize_with_image(text, tokenizer, image_id)
    position = ids.index(image_id)
    return ids[:position] + [image_id] * image_tokens + ids[position + 1:]


def greedy_one_by_one(model, prompt_ids: list[int], pixels: torch.Tensor, steps: int) -> list[int]:
    """Greedy decoding of one question without padding, cache or generate: argmax of a full forward per step."""
    ids = torch.tensor([prompt_ids])  # (1, T)
    new_ids: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids, pixel_values=pixels[None], attention_mask=torch.ones_like(ids)).logits
            next_id = int(logits[0, -1].argmax())  # logits: (1, T, V)
            if next_id == EOS_ID:
                break
            new_ids.append(next_id)
            ids = torch.cat([ids, torch.tensor([[next_id]])], dim=1)
    return new_ids


def test_batched_answers_equal_one_by_one_greedy(model_dir, data_dir, tokenizer):
    eval_model = load_eval_model(model_dir, torch.device("cpu"), torch.float32)
    questions = [run.load_questions(data_dir, task, 2)[index] for task, index in
                 (("aid", 0), ("lrben", 0), ("referring", 1), ("region_captioning", 0), ("hrben", 1))]
    prompts = [question["prompt"] for question in questions]
    pixels = load_pixels([data_dir / "images" / question["image"] for question in questions], eval_model.image_size)
    prompt_ids = [reference_prompt_ids(prompt, tokenizer, eval_model.num_image_tokens) for prompt in prompts]
    assert len({len(ids) for ids in prompt_ids}) > 1, "prompts of one length would not exercise the padding"
    steps = 8

    # Make EOS come out wherever one token would, a token some answers hold and others do not, so rows stop at
    # different steps: greedy decoding then depends on per-row stopping as well as on the padding.
    free_running = [greedy_one_by_one(eval_model.model, ids, image, steps) for ids, image in zip(prompt_ids, pixels)]
    stop_token = next((token for token in free_running[0] if any(token not in other for other in free_running[1:])),
                      None)
    assert stop_token is not None, f"the tiny model answers every prompt alike: {free_running}"
    with torch.no_grad():
        lm_head = eval_model.model.get_output_embeddings().weight  # (V, H)
        lm_head[EOS_ID] = lm_head[stop_token]
        lm_head[stop_token] = -lm_head[stop_token]

    expected_ids = [greedy_one_by_one(eval_model.model, ids, image, steps) for ids, image in zip(prompt_ids, pixels)]
    expected = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in expected_ids]
    lengths = [len(ids) for ids in expected_ids]
    assert len(set(expected)) > 1 and max(lengths) == steps and min(lengths) < steps, expected_ids
    assert generate_answers(eval_model, prompts, pixels, max_new_tokens=steps) == expected
    assert [generate_answers(eval_model, [prompt], image[None], max_new_tokens=steps)[0]
            for prompt, image in zip(prompts, pixels)] == expected


def test_decode_answer_stops_at_the_first_eos(tokenizer):
    text_ids = tokenizer("yes").input_ids[1:]
    assert decode_answer(text_ids + [EOS_ID] + text_ids, tokenizer, EOS_ID) == "yes"


# ----------------------------------------------------------------------------------------------------- end to end


def test_run_writes_answers_results_and_report(data_dir, complete_run):
    out_dir, generated_rows = complete_run
    assert sum(generated_rows) == TOTAL_QUESTIONS and max(generated_rows) == 3

    for task in BENCH_SOURCES:
        questions = read_lines(data_dir / f"{task}.jsonl")
        answers = read_lines(out_dir / "answers" / "tiny" / f"{task}.jsonl")
        assert [answer["question_id"] for answer in answers] == [question["question_id"] for question in questions]
        for question, answer in zip(questions, answers):
            assert isinstance(answer["answer"], str)
            assert answer["ground_truth"] == question["ground_truth"] and answer["image_id"] == question["image"]
            assert answer.get("type") == question["type"] and answer.get("size_group") == question["size_group"]
    assert sorted(path.name for path in (out_dir / "answers" / "tiny").iterdir()) == sorted(
        f"{task}.jsonl" for task in BENCH_SOURCES)

    results = json.loads((out_dir / "results.json").read_text())["tiny"]
    assert set(results) == set(BENCH_SOURCES) | {"efficiency"}
    assert all(results[task]["n"] == QUESTIONS_PER_TASK for task in BENCH_SOURCES)
    # GeoChat's scene rule, written out independently of the scorer.
    aid_answers = read_lines(out_dir / "answers" / "tiny" / "aid.jsonl")
    correct = sum(answer["answer"].replace(" ", "").replace(".", "").lower()
                  == answer["question_id"].split("/")[0].lower() for answer in aid_answers)
    assert results["aid"]["oa"] == pytest.approx(correct / QUESTIONS_PER_TASK)
    assert results["region_captioning"]["meteor"] is None
    report = (out_dir / "report.md").read_text()
    assert "| | tiny | GeoChat-7B (paper)" in report and "Table 6: visual grounding" in report
    assert (out_dir / "confusion_tiny_aid.png").stat().st_size > 0
    assert (out_dir / "grounding_examples.png").stat().st_size > 0


def test_interrupted_run_resumes_without_reanswering(model_dir, data_dir, tmp_path, complete_run, generated_rows):
    complete_dir, resumed_dir = complete_run[0], tmp_path / "resumed"
    tasks = ("aid", "lrben")
    assert run_eval(model_dir, data_dir, resumed_dir, "--tasks", ",".join(tasks), "--limit", "2") == 0
    assert sum(generated_rows) == 2 * len(tasks)
    aid_file = resumed_dir / "answers" / "tiny" / "aid.jsonl"
    text = aid_file.read_text(encoding="utf-8")
    aid_file.write_text(text[: len(text) - 10], encoding="utf-8")  # the second answer's write was cut short
    generated_rows.clear()

    assert run_eval(model_dir, data_dir, resumed_dir, "--tasks", ",".join(tasks)) == 0
    assert sum(generated_rows) == (QUESTIONS_PER_TASK - 2) * len(tasks) + 1
    for task in tasks:
        assert read_lines(resumed_dir / "answers" / "tiny" / f"{task}.jsonl") == read_lines(
            complete_dir / "answers" / "tiny" / f"{task}.jsonl")
    assert json.loads((resumed_dir / "results.json").read_text())["tiny"]["aid"]["n"] == QUESTIONS_PER_TASK
    generated_rows.clear()
    assert run_eval(model_dir, data_dir, resumed_dir, "--tasks", ",".join(tasks)) == 0
    assert generated_rows == []  # everything answered: the model is not even loaded


def test_rank_parts_merge_into_the_single_process_answers(model_dir, data_dir, tmp_path, complete_run):
    single_dir, ranks_dir = complete_run[0], tmp_path / "ranks"
    options = run.build_parser().parse_args(["--model", f"tiny={model_dir}", "--data", str(data_dir), "--out",
                                             str(ranks_dir), "--batch-size", "2", "--max-new-tokens", "4",
                                             "--device", "cpu", "--no-meteor", "--no-latency"])
    models = run.parse_models(options.model)
    questions = {task: run.load_questions(data_dir, task, None) for task in ("hrben", "referring")}
    ranks = [run.Dist(rank=rank, world_size=2, local_rank=0) for rank in range(2)]
    # Both ranks plan before either writes, as the barrier in run_generation guarantees under torchrun.
    plans = [run.plan_rank(models, questions, ranks_dir, dist) for dist in ranks]
    for dist, pending in zip(ranks, plans):
        run.generate_pending(models, pending, options, dist)
    rank1 = read_lines(ranks_dir / "answers" / "tiny" / "hrben.part1.jsonl")
    assert [answer["question_id"] for answer in rank1] == [
        question["question_id"] for question in questions["hrben"][1::2]]
    assert run.score_and_report(models, questions, options) == 0
    for task in questions:
        assert read_lines(ranks_dir / "answers" / "tiny" / f"{task}.jsonl") == read_lines(
            single_dir / "answers" / "tiny" / f"{task}.jsonl")
    assert not list((ranks_dir / "answers" / "tiny").glob("*.part*.jsonl"))


def test_missing_task_file_is_an_error_before_any_model_is_loaded(model_dir, tmp_path, capsys, generated_rows):
    (tmp_path / "aid.jsonl").write_text("")
    assert run.main(["--model", str(model_dir), "--tasks", "aid,hrben", "--data", str(tmp_path), "--out",
                     str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "hrben.jsonl does not exist" in error and "data_prep bench --task hrben" in error
    assert generated_rows == [] and not (tmp_path / "out").exists()


def srun_task_env(task: int, tasks: int, job_id: int) -> dict:
    """What a bare ``srun --ntasks=N`` gives a task: Slurm's variables only (no RANK, WORLD_SIZE or MASTER_*)."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(SLURM_PROCID=str(task), SLURM_LOCALID=str(task), SLURM_NTASKS=str(tasks), SLURM_JOB_ID=str(job_id),
               SLURM_JOB_NODELIST="localhost", OMP_NUM_THREADS="1")
    return env


def test_srun_tasks_each_get_their_own_rank_and_answer_part_file(model_dir, data_dir, tmp_path, complete_run):
    """Two eval tasks started as srun starts them: each finds its rank from SLURM_PROCID (the runtime's discovery),
    they meet at the rendezvous derived from the job (first host, port from the job id), answer disjoint halves
    into their own part files, and rank 0 merges them into the single-process answers."""
    job_id = free_port() - 20000  # the derived MASTER_PORT, 20000 + job id % 20000, is then a free port
    probe = ("import json; from pathlib import Path; from kd_pipeline.eval import run\n"
             "dist = run.init_dist(); run.barrier(dist)\n"
             "print(json.dumps([dist.rank, dist.world_size, run.part_path(Path('answers'), 'hrben', dist).name]))\n")
    probes = [subprocess.Popen([sys.executable, "-c", probe], env=srun_task_env(task, 2, job_id),
                               stdout=subprocess.PIPE, text=True) for task in range(2)]
    seen = sorted(json.loads(process.communicate(timeout=120)[0].strip().splitlines()[-1]) for process in probes)
    assert seen == [[0, 2, "hrben.part0.jsonl"], [1, 2, "hrben.part1.jsonl"]]

    out_dir = tmp_path / "srun"
    command = [sys.executable, "-m", "kd_pipeline.eval", "run", "--model", f"tiny={model_dir}", "--data",
               str(data_dir), "--out", str(out_dir), "--tasks", "hrben", "--batch-size", "2", "--max-new-tokens", "4",
               "--device", "cpu", "--no-meteor", "--no-latency", "--no-paper"]
    tasks = [subprocess.Popen(command, env=srun_task_env(task, 2, job_id + 1), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for task in range(2)]
    outputs = [process.communicate(timeout=600)[0] for process in tasks]
    assert [process.returncode for process in tasks] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert read_lines(out_dir / "answers" / "tiny" / "hrben.jsonl") == read_lines(
        complete_run[0] / "answers" / "tiny" / "hrben.jsonl")

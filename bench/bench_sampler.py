"""Benchmark of the teacher-mixed sampler (kd_pipeline.sampling.sample_mixed).

Measures, on random-weight Llava models:
1. decode throughput with the KV cache vs recomputing the full sequence (and the image features) every step;
2. the cost of one cached mixed step (student + teacher forwards, mixture, draw) relative to a student-only step;
3. (CPU only) under ZeRO-3 on 2 ranks, all with sync_ranks=True: decoding with the parameters gathered once per
   rollout (`kd_pipeline.sampling.zero3.gathered_for_decoding`) vs partitioned parameters (every forward gathers
   every layer), plus `deepspeed.zero.GatheredParameters` alone ("naive"), whose gathered parameters the ZeRO-3
   hooks release again after the first forward;
4. a stage-2 rollout buffer (`buffer_micro_batches` micro-batches of `micro_batch` prompts of different widths)
   decoded the way the recipe does it (`kd_pipeline.sampling.decode_in_batches`): one micro-batch per decode vs the
   whole buffer in one decode (`minillm.rollout_batch_size=0`); rollout tokens/s of each and their ratio.

Throughput counts decoded positions (rows x steps) per second. The EOS id is set outside the vocabulary so every
row decodes max_new_tokens and all paths do the same work.

Runbook (from the repository root):
    DS_ACCELERATOR=cpu .venv/bin/python bench/bench_sampler.py --quick   # smoke run, about 2-3 min on 2 cores
    DS_ACCELERATOR=cpu .venv/bin/python bench/bench_sampler.py           # -> bench/results/sampler_cpu.json
    .venv/bin/python bench/bench_sampler.py --device cuda                # -> bench/results/sampler_cuda.json
The CPU run re-launches this file as `python -m torch.distributed.run --standalone --nproc_per_node 2 ...
--zero3-worker` for part 3; DeepSpeed builds its small shm op on the first run (about a minute, cached after).
CUDA shapes: 1.3B teacher (hidden 2048, 24 layers) and 0.5B student (hidden 1280, 24 layers), vocab 32000,
576 image tokens + 64 text tokens per prompt, batch 16, 256 new tokens, bf16.
"""

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from kd_pipeline.sampling import decode_in_batches, draw_tokens, mixture_log_probs, sample_mixed
from kd_pipeline.sampling.zero3 import gathered_for_decoding

logger = logging.getLogger("bench_sampler")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
PAD_ID = 0
NEVER_EOS = -1  # outside the vocabulary: rows never finish, every path decodes max_new_tokens
PATCH = 14


@dataclass(frozen=True)
class Shape:
    """Model and batch sizes of one benchmark setting."""

    student_hidden: int
    teacher_hidden: int
    layers: int
    head_dim: int
    vocab: int
    image_size: int  # (image_size / 14)^2 image tokens per prompt
    batch: int
    text_tokens: int
    new_tokens: int
    dtype: str
    micro_batch: int  # part 4: prompts per micro-batch ...
    buffer_micro_batches: int  # ... and micro-batches per rollout buffer


SHAPES = {
    "cpu": Shape(128, 192, 4, 32, 2000, 56, 4, 24, 64, "float32", 2, 8),
    "cpu_quick": Shape(64, 96, 2, 32, 1000, 28, 2, 12, 16, "float32", 2, 4),
    "cuda": Shape(1280, 2048, 24, 64, 32000, 336, 16, 64, 256, "bfloat16", 4, 8),
    "cuda_quick": Shape(1280, 2048, 24, 64, 32000, 336, 16, 64, 32, "bfloat16", 4, 8),
}


def build_llava(shape: Shape, hidden: int, seed: int) -> LlavaForConditionalGeneration:
    """Random Llava with a small CLIP tower (the vision side is not what is measured) and a Llama LM."""
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              image_size=shape.image_size, patch_size=PATCH, projection_dim=64)
    heads = hidden // shape.head_dim
    text = LlamaConfig(hidden_size=hidden, intermediate_size=int(2.7 * hidden), num_hidden_layers=shape.layers,
                       num_attention_heads=heads, num_key_value_heads=heads, vocab_size=shape.vocab,
                       max_position_embeddings=4096)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=shape.vocab - 1,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    return LlavaForConditionalGeneration(config).to(getattr(torch, shape.dtype)).eval()


def make_prompts(shape: Shape, seed: int, device: torch.device,
                 rows_in_batch: int | None = None) -> dict[str, torch.Tensor]:
    """Left-padded image prompts of varied text lengths: image placeholders, then 1/2..1 x text_tokens of text."""
    generator = torch.Generator().manual_seed(seed)
    image_tokens = (shape.image_size // PATCH) ** 2
    batch = rows_in_batch or shape.batch
    rows = []
    for _ in range(batch):
        text_length = int(torch.randint(shape.text_tokens // 2, shape.text_tokens + 1, (1,), generator=generator))
        text = torch.randint(1, shape.vocab - 1, (text_length,), generator=generator).tolist()
        rows.append([1] + [shape.vocab - 1] * image_tokens + text)
    width = max(len(row) for row in rows)
    input_ids = torch.tensor([[PAD_ID] * (width - len(row)) + row for row in rows], device=device)
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], device=device)
    pixel_values = torch.randn(batch, 3, shape.image_size, shape.image_size, generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "pixel_values": pixel_values.to(device, getattr(torch, shape.dtype))}


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rollout(student, teacher, prompts, new_tokens: int, *, use_cache: bool, sync_ranks: bool = False,
                 device: torch.device) -> tuple[float, torch.Tensor]:
    """Seconds for one sample_mixed rollout and its tokens."""
    generator = torch.Generator(device=device).manual_seed(0)
    _synchronise(device)
    start = time.perf_counter()
    rollout = sample_mixed(student, teacher, prompts["input_ids"], prompts["attention_mask"],
                           prompts["pixel_values"], max_new_tokens=new_tokens, eos_token_id=NEVER_EOS,
                           pad_token_id=PAD_ID, generator=generator, use_cache=use_cache, sync_ranks=sync_ranks)
    _synchronise(device)
    return time.perf_counter() - start, rollout.tokens


@torch.no_grad()
def cached_step_seconds(models, prompts, steps: int, *, device: torch.device) -> float:
    """Median seconds of one cached decode step that runs `models` (student first) and draws the next token:
    from the student alone for one model, from the 0.2 teacher mixture for two. Mirrors sample_mixed's step."""
    generator = torch.Generator(device=device).manual_seed(0)
    sequence_mask = prompts["attention_mask"]
    positions = (sequence_mask.cumsum(-1) - 1).clamp(min=0)
    outputs = [model(input_ids=prompts["input_ids"], attention_mask=sequence_mask, position_ids=positions,
                     pixel_values=prompts["pixel_values"], use_cache=True, logits_to_keep=1) for model in models]
    durations = []
    for _ in range(steps):
        _synchronise(device)
        start = time.perf_counter()
        logits = [output.logits[:, -1] for output in outputs]  # each (B, V)
        if len(models) == 1:
            tokens = draw_tokens(torch.log_softmax(logits[0].float(), -1), generator)  # (B,)
        else:
            tokens = draw_tokens(mixture_log_probs(logits[0], logits[1], mix_alpha=0.2)[2], generator)  # (B,)
        sequence_mask = torch.cat([sequence_mask, torch.ones_like(sequence_mask[:, :1])], dim=-1)
        next_position = sequence_mask.sum(-1, keepdim=True) - 1  # (B, 1)
        outputs = [model(input_ids=tokens[:, None], attention_mask=sequence_mask, position_ids=next_position,
                         cache=output.cache, use_cache=True, logits_to_keep=1)
                   for model, output in zip(models, outputs)]
        _synchronise(device)
        durations.append(time.perf_counter() - start)
    return statistics.median(durations)


def buffer_rollout_rates(student, teacher, shape: Shape, repeats: int, device: torch.device) -> dict:
    """Part 4: one rollout buffer decoded per micro-batch vs in one decode, as the stage-2 recipe decodes it."""
    batches = [make_prompts(shape, seed=10 + index, device=device, rows_in_batch=shape.micro_batch)
               for index in range(shape.buffer_micro_batches)]
    rows = shape.micro_batch * shape.buffer_micro_batches

    def decode(prompts):
        return sample_mixed(student, teacher, prompts["input_ids"], prompts["attention_mask"],
                            prompts["pixel_values"], max_new_tokens=shape.new_tokens, eos_token_id=NEVER_EOS,
                            pad_token_id=PAD_ID, generator=torch.Generator(device=device).manual_seed(0))

    modes = {"per_micro_batch": 1, "buffer_batched": 0}  # micro-batches per decode (0: the whole buffer)
    timings: dict[str, list[float]] = {name: [] for name in modes}
    for _ in tqdm(range(repeats), desc="buffer rollouts", unit="repeat"):
        for name, batches_per_decode in modes.items():  # interleaved, so machine noise hits both alike
            _synchronise(device)
            start = time.perf_counter()
            rollouts = decode_in_batches(batches, batches_per_decode, decode, pad_token_id=PAD_ID)
            _synchronise(device)
            timings[name].append(time.perf_counter() - start)
    tokens = sum(int(rollout.mask.sum()) for rollout in rollouts)
    assert tokens == rows * shape.new_tokens  # EOS never drawn: every row decodes every step in both modes
    rates = {name: tokens / statistics.median(values) for name, values in timings.items()}
    return {"prompts": rows, "micro_batch": shape.micro_batch,
            **{f"{name}_tokens_per_s": rate for name, rate in rates.items()},
            "speedup_buffer_batched_over_per_micro_batch": rates["buffer_batched"] / rates["per_micro_batch"]}


def run_single_process(shape: Shape, repeats: int, device: torch.device) -> dict:
    """Parts 1 and 2: KV cache vs recompute, mixed vs student-only step."""
    student = build_llava(shape, shape.student_hidden, seed=0).to(device)
    teacher = build_llava(shape, shape.teacher_hidden, seed=1).to(device)
    prompts = make_prompts(shape, seed=0, device=device)
    time_rollout(student, teacher, prompts, 2, use_cache=True, device=device)  # warm-up: kernels, allocator
    positions = shape.batch * shape.new_tokens
    timings: dict[str, list[float]] = {"cached": [], "recomputed": []}
    tokens = {}
    progress = tqdm(total=2 * repeats + 2, desc="single-process", unit="run")
    for _ in range(repeats):
        for name, use_cache in (("cached", True), ("recomputed", False)):
            seconds, tokens[name] = time_rollout(student, teacher, prompts, shape.new_tokens, use_cache=use_cache,
                                                 device=device)
            timings[name].append(seconds)
            progress.update()
    timed_steps = min(shape.new_tokens, 32)
    student_only = cached_step_seconds([student], prompts, timed_steps, device=device)
    progress.update()
    mixed = cached_step_seconds([student, teacher], prompts, timed_steps, device=device)
    progress.update()
    progress.close()
    buffer = buffer_rollout_rates(student, teacher, shape, repeats, device)
    cached_rate = positions / statistics.median(timings["cached"])
    recomputed_rate = positions / statistics.median(timings["recomputed"])
    return {
        "kv_cache": {"cached_positions_per_s": cached_rate, "recomputed_positions_per_s": recomputed_rate,
                     "speedup_cached_over_recomputed": cached_rate / recomputed_rate,
                     "same_tokens": bool(torch.equal(tokens["cached"], tokens["recomputed"]))},
        "step_cost": {"student_only_step_s": student_only, "mixed_step_s": mixed,
                      "mixed_over_student_only": mixed / student_only},
        "buffer": buffer,
    }


def zero3_worker(shape: Shape, repeats: int, output_path: str) -> None:
    """Part 3, one rank of two (launched by torch.distributed.run): ZeRO-3 gathered vs partitioned decoding."""
    import deepspeed  # only the ZeRO-3 worker needs DeepSpeed (and its CPU accelerator setup)

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    # Minimal stage-3 inference config for the benchmark; persistence threshold 0 so that even these small
    # parameters are partitioned (the default 1e5 would keep most of a tiny model whole on every rank).
    ds_config = {"train_micro_batch_size_per_gpu": 1,
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        student = build_llava(shape, shape.student_hidden, seed=0)  # same seeds on every rank: same weights
        teacher = build_llava(shape, shape.teacher_hidden, seed=1)
    student_engine = deepspeed.initialize(model=student, config=ds_config)[0]
    teacher_engine = deepspeed.initialize(model=teacher, config=ds_config)[0]
    student_engine.eval()
    teacher_engine.eval()
    all_parameters = list(student.parameters()) + list(teacher.parameters())
    prompts = make_prompts(shape, seed=100 + rank, device=torch.device("cpu"))  # each rank its own prompts
    cpu = torch.device("cpu")

    def rollout(new_tokens):
        return time_rollout(student_engine, teacher_engine, prompts, new_tokens, use_cache=True, sync_ranks=True,
                            device=cpu)

    def gathered_rollout(new_tokens):
        with gathered_for_decoding(student_engine, teacher_engine):  # one gather for the whole rollout
            return rollout(new_tokens)

    def naive_gathered_rollout(new_tokens):
        with deepspeed.zero.GatheredParameters(all_parameters):
            return rollout(new_tokens)

    modes = {"gathered": gathered_rollout, "naive_gathered": naive_gathered_rollout, "partitioned": rollout}
    gathered_rollout(2)  # warm-up
    timings: dict[str, list[float]] = {name: [] for name in modes}
    tokens = {}
    progress = tqdm(total=len(modes) * repeats, desc=f"zero3 rank {rank}", unit="run", disable=rank != 0)
    for _ in range(repeats):
        for name, run in modes.items():
            seconds, tokens[name] = run(shape.new_tokens)
            timings[name].append(seconds)
            progress.update()
    progress.close()
    positions = shape.batch * shape.new_tokens
    same_tokens = torch.tensor(int(all(torch.equal(tokens["partitioned"], tokens[name]) for name in modes)))
    dist.all_reduce(same_tokens, op=dist.ReduceOp.MIN)
    if rank == 0:
        rates = {name: positions / statistics.median(timings[name]) for name in modes}
        result = {"world_size": dist.get_world_size(),
                  **{f"{name}_positions_per_s_per_rank": rate for name, rate in rates.items()},
                  "speedup_gathered_over_partitioned": rates["gathered"] / rates["partitioned"],
                  "speedup_naive_gathered_over_partitioned": rates["naive_gathered"] / rates["partitioned"],
                  "same_tokens": bool(same_tokens.item())}
        Path(output_path).write_text(json.dumps(result))
    dist.barrier()


def launch_zero3(shape_name: str, repeats: int) -> dict:
    """Runs zero3_worker on 2 CPU ranks in a child torch.distributed.run and returns rank 0's result."""
    with tempfile.TemporaryDirectory() as scratch:
        output_path = Path(scratch) / "zero3.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   str(Path(__file__).resolve()), "--zero3-worker", "--shape", shape_name, "--repeats",
                   str(repeats), "--worker-output", str(output_path)]
        environment = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")  # 1 thread per rank
        logger.info("launching: %s", " ".join(command))
        subprocess.run(command, env=environment, check=True)
        return json.loads(output_path.read_text())


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes and one repeat (smoke run)")
    parser.add_argument("--skip-zero3", action="store_true", help="CPU: leave out the 2-rank ZeRO-3 comparison")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON path (default bench/results/sampler_<device>.json)")
    parser.add_argument("--zero3-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=None, help="timed rollouts per setting (median reported)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU: torch threads per process (1, like each ZeRO-3 rank, keeps the parts comparable)")
    parser.add_argument("--worker-output", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    arguments = parse_arguments(argv)
    shape_name = arguments.shape or (f"{arguments.device}_quick" if arguments.quick else arguments.device)
    repeats = arguments.repeats or (1 if arguments.quick else 3)
    shape = SHAPES[shape_name]
    if arguments.device == "cpu":
        torch.set_num_threads(arguments.threads)
    if arguments.zero3_worker:
        zero3_worker(shape, repeats, arguments.worker_output)
        return None
    if arguments.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_sampler: --device cuda needs a visible CUDA GPU.")
    device = torch.device(arguments.device)
    results = {"device": arguments.device, "shape_name": shape_name, "shape": asdict(shape), "repeats": repeats,
               "torch": torch.__version__, "threads": torch.get_num_threads()}
    results.update(run_single_process(shape, repeats, device))
    if arguments.device == "cpu" and not arguments.skip_zero3:
        results["zero3"] = launch_zero3(shape_name, repeats)
    output = arguments.output or RESULTS_DIR / f"sampler_{arguments.device}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"KV cache vs recompute: {results['kv_cache']['speedup_cached_over_recomputed']:.2f}x "
          f"({results['kv_cache']['cached_positions_per_s']:.1f} vs "
          f"{results['kv_cache']['recomputed_positions_per_s']:.1f} positions/s)")
    print(f"mixed step / student-only step: {results['step_cost']['mixed_over_student_only']:.2f}x")
    buffer = results["buffer"]
    print(f"rollout buffer of {buffer['prompts']} prompts, whole buffer vs one micro-batch of {buffer['micro_batch']} "
          f"per decode: {buffer['speedup_buffer_batched_over_per_micro_batch']:.2f}x "
          f"({buffer['buffer_batched_tokens_per_s']:.1f} vs {buffer['per_micro_batch_tokens_per_s']:.1f} tokens/s)")
    if "zero3" in results:
        zero3 = results["zero3"]
        print(f"ZeRO-3 gathered vs partitioned: {zero3['speedup_gathered_over_partitioned']:.2f}x "
              f"({zero3['gathered_positions_per_s_per_rank']:.1f} vs "
              f"{zero3['partitioned_positions_per_s_per_rank']:.1f} positions/s per rank); "
              f"GatheredParameters alone: {zero3['speedup_naive_gathered_over_partitioned']:.2f}x")
    print(f"written: {output}")
    return results


if __name__ == "__main__":
    main()

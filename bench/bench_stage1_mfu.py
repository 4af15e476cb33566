"""Stage-1 model FLOPs utilisation on one device, padded vs packed micro-batches side by side in one run.

The step is the real one: ``build_engines`` (DeepSpeed ZeRO-3 on a group of one, AdamW, the frozen teacher with its
gathered LM head) and the stage-1 recipe's ``loss_terms`` (teacher forward, student forward with the fused KL and the
alignment term), then DeepSpeed's backward and step. Only the data loader is left out: the micro-batches are built
in memory (GeoChat-shaped samples: one 504-px image, 1,296 image tokens, text lengths uniform on GeoChat's stated
50-2,048 tokens as bench_packing.py assumes, the last quarter of the text supervised), so the number is the model's,
not the disk's. Both layouts run the same samples in the same order with the same engines.

Models (random weights, bf16 on CUDA): GeoChat's CLIP ViT-L/14 tower at 504 px (frozen) under a ~1.3B LLaMA teacher
(hidden 2048, 24 layers) and a ~0.5B student (hidden 1280, 24 layers), the LLM sizes of bench_sampler.py; vocabulary
32,001 (LLaMA's 32,000 + <image>, from a generated word-level tokenizer). The student trains its LLM and projector in
full, without gradient checkpointing (MFU counts no recomputation).

FLOPs per step (``step_flops`` from ``kd_pipeline.eval.efficiency.forward_flops``: 2 per multiply-accumulate,
attention as full L x L products, each sample at its own length, so padding never counts as useful work; a test
finds it equal to torch's FlopCounterMode on a tiny step): the teacher's forward and the student's forward and
backward, optimizer excluded. MFU = FLOPs / (step time x the device's dense bf16 peak); the peak comes from
``PEAK_BF16_TFLOPS`` by device name, or ``--peak-tflops``.

    python bench/bench_stage1_mfu.py --device cuda          # -> bench/results/stage1_mfu_cuda.json
    python bench/bench_stage1_mfu.py --tiny                 # CPU dry run of the same code at tiny sizes
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from kd_pipeline.prompts import IGNORE_INDEX  # noqa: E402

log = logging.getLogger("bench_stage1_mfu")
RESULTS_DIR = REPO_ROOT / "bench" / "results"
PEAK_BF16_TFLOPS = (  # dense bf16 tensor-core peaks of NVIDIA's datasheets; first match on the device name wins
    ("H200 NVL", 835.0), ("H200", 989.4), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.4),
    ("A100", 312.0),
)
SIZES = {
    # LLM hidden / layers / heads / MLP width; vision hidden / layers / heads; image px; text length range; vocab
    "full": {"teacher": (2048, 24, 32, 5504), "student": (1280, 24, 20, 3456), "vision": (1024, 24, 16),
             "image_size": 504, "text_range": (50, 2048), "vocab": 32000},
    "tiny": {"teacher": (96, 2, 4, 192), "student": (64, 2, 4, 128), "vision": (32, 2, 2),
             "image_size": 56, "text_range": (8, 40), "vocab": 500},
}


def peak_tflops(device_name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in device_name), None)


def write_word_tokenizer(folder: Path, vocab_size: int) -> Path:
    """A word-level tokenizer with LLaMA's special ids (unk 0, bos 1, eos 2) and ``vocab_size`` rows: the step only
    needs ids and the vocabulary size, and nothing may be downloaded."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{index}": index for index in range(3, vocab_size)}}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<unk>"}))
    return folder


def run_config(sizes: dict, tokenizer: Path, micro_batch_size: int, steps: int):
    from kd_pipeline.config import config_from_dict

    def model(llm, frozen: bool) -> dict:
        hidden, layers, heads, mlp = llm
        vision_hidden, vision_layers, vision_heads = sizes["vision"]
        return {"arch": "tiny", "hidden_size": hidden, "num_layers": layers, "num_heads": heads,
                "intermediate_size": mlp, "vision_hidden_size": vision_hidden, "vision_layers": vision_layers,
                "vision_heads": vision_heads, "image_size": sizes["image_size"], "patch_size": 14, "lora": False,
                "train_projector": not frozen, "gradient_checkpointing": False}

    return config_from_dict({
        "run": {"stage": "kd_sft", "seed": 0, "output_dir": str(tokenizer.parent / "run")},
        "student": model(sizes["student"], frozen=False), "teacher": model(sizes["teacher"], frozen=True),
        "data": {"tokenizer": str(tokenizer), "max_length": sizes["text_range"][1]},
        "train": {"max_steps": steps, "micro_batch_size": micro_batch_size, "lr": 1e-5, "warmup_steps": 0},
        "kd": {"alpha_kd": 0.5, "temperature": 1.0, "align_weight": 1.0, "fused": True},
        "deepspeed": {"config": str(REPO_ROOT / "ds_configs" / "zero3.json")},
    })


def make_items(count: int, sizes: dict, num_image_tokens: int, image_token_id: int, seed: int):
    """GeoChat-shaped samples: BOS, the image block, text (its last quarter and EOS supervised)."""
    from kd_pipeline.data.samples import EncodedItem

    generator = torch.Generator().manual_seed(seed)
    low, high = sizes["text_range"]
    items = []
    for index, text in enumerate(torch.randint(low, high + 1, (count,), generator=generator).tolist()):
        body = torch.randint(3, sizes["vocab"], (text,), generator=generator).tolist()
        input_ids = [1] + [image_token_id] * num_image_tokens + body + [2]
        answer = max(1, text // 4) + 1
        labels = [IGNORE_INDEX] * (len(input_ids) - answer) + input_ids[-answer:]
        pixels = torch.randn(3, sizes["image_size"], sizes["image_size"], generator=generator).numpy()
        items.append(EncodedItem(f"s{index}", input_ids, labels, pixels))
    return items


def step_flops(student_config, teacher_config, items, num_image_tokens: int) -> int:
    """Useful FLOPs of one stage-1 step on ``items``, the matrix products a step must run at each sample's length.

    Teacher: one forward, LM head on the supervised positions (inside the fused KL). Student: the frozen tower
    forward only; LLM, LM head (supervised positions) and the projector's second Linear forward and backward (3x);
    the projector's first Linear forward and weight gradient only (2x: the frozen tower needs no input gradient);
    the feature map P (student -> teacher width, when they differ) 3x on the image tokens.
    """
    from kd_pipeline.eval.efficiency import forward_flops

    vision_width = student_config.vision_config.hidden_size
    student_width = student_config.text_config.hidden_size
    teacher_width = teacher_config.text_config.hidden_size
    total = 0
    for item in items:
        images = int(item.pixel_values is not None)
        text = len(item.input_ids) - images * num_image_tokens
        supervised = sum(label != IGNORE_INDEX for label in item.labels[1:])
        teacher = forward_flops(teacher_config, text, images, logits_positions=supervised)
        student = forward_flops(student_config, text, images, logits_positions=supervised)
        projector_in = 2 * images * num_image_tokens * vision_width * student_width  # Linear(vision -> H) forward
        feature_map = 2 * images * num_image_tokens * student_width * teacher_width if student_width != teacher_width \
            else 0
        total += (teacher.matmul_only + student.vision_matmul + student.vision_attention
                  + 3 * (student.llm_matmul + student.llm_attention + student.lm_head_matmul)
                  + 2 * projector_in + 3 * (student.projector_matmul - projector_in) + 3 * feature_map)
    return total


def measure(engines, config, runtime, batches: list[dict], warmup: int, label: str) -> dict:
    """Seconds per optimizer step (one micro-batch each) after ``warmup`` steps, and the peak device memory."""
    from kd_pipeline.recipes.common import to_device
    from kd_pipeline.recipes.supervised import loss_terms

    cuda = runtime.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for batch in tqdm(batches, desc=label, unit="step"):
        batch = to_device(batch, runtime.device, runtime.dtype)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        terms = loss_terms(engines, batch, config)
        engines.student.backward(terms["loss"])
        engines.student.step()
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    measured = seconds[warmup:]
    return {"step_s": statistics.median(measured), "step_s_all": seconds, "loss_last": float(terms["loss"]),
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def run(args) -> dict:
    from kd_pipeline.data.collate import collate_packed, collate_right_padded
    from kd_pipeline.data.packing import FLASH_BACKENDS
    from kd_pipeline.engine.build import build_engines
    from kd_pipeline.models.counting import count_parameters
    from kd_pipeline.models.layout import unwrap_model
    from kd_pipeline.runtime import init_runtime

    sizes = SIZES["tiny" if args.tiny else "full"]
    runtime = init_runtime()
    if args.device == "cuda" and runtime.device.type != "cuda":
        raise SystemExit("bench_stage1_mfu: --device cuda, but the runtime found no CUDA device "
                         "(or DS_ACCELERATOR=cpu is set)")
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = write_word_tokenizer(Path(scratch) / "tokenizer", sizes["vocab"])
        config = run_config(sizes, tokenizer, args.micro_batch_size, 2 * (args.warmup + args.steps))
        engines = build_engines(config, runtime)
    student_llava = unwrap_model(engines.student_llava)
    teacher_llava = unwrap_model(engines.teacher_llava)
    items = make_items((args.warmup + args.steps) * args.micro_batch_size, sizes, engines.num_image_tokens,
                       engines.image_token_id, args.seed)
    groups = [items[start:start + args.micro_batch_size] for start in range(0, len(items), args.micro_batch_size)]
    flops = [step_flops(student_llava.config, teacher_llava.config, group, engines.num_image_tokens)
             for group in groups[args.warmup:]]
    real_tokens = [sum(len(item.input_ids) for item in group) for group in groups[args.warmup:]]
    device_name = torch.cuda.get_device_name(runtime.device) if runtime.device.type == "cuda" else "cpu"
    peak = args.peak_tflops or (peak_tflops(device_name) if runtime.device.type == "cuda" else None)
    attention = student_llava.config.text_config._attn_implementation
    layouts = {}
    for layout, collate in (("padded", collate_right_padded), ("packed", collate_packed)):
        batches = [collate(group, pad_id=engines.tokenizer.pad_token_id, image_size=sizes["image_size"])
                   for group in groups]
        result = measure(engines, config, runtime, batches, args.warmup, layout)
        # Positions the model runs: the batch's, except a packed batch under flash-attn, which runs unpadded.
        one_row = layout == "packed" and attention in FLASH_BACKENDS
        positions = real_tokens if one_row else [int(batch["input_ids"].numel()) for batch in batches[args.warmup:]]
        flops_per_s = statistics.mean(flops) / result["step_s"]
        layouts[layout] = {**result, "model_positions_per_step": statistics.mean(positions),
                           "real_tokens_per_step": statistics.mean(real_tokens),
                           "non_pad_fraction": sum(real_tokens) / sum(positions),
                           "tokens_per_s": statistics.mean(real_tokens) / result["step_s"],
                           "model_tflops_per_s": flops_per_s / 1e12,
                           "mfu": flops_per_s / (peak * 1e12) if peak else None}
    parameters = {name: count_parameters(model)["total"] for name, model in
                  (("student", student_llava), ("teacher", teacher_llava))}
    return {"device": device_name, "device_type": runtime.device.type, "dtype": str(runtime.dtype),
            "peak_bf16_tflops": peak, "mfu_note": None if peak else "device peak unknown: pass --peak-tflops",
            "sizes": "tiny" if args.tiny else "full", "parameters": parameters,
            "attention": {"student": attention, "teacher": teacher_llava.config.text_config._attn_implementation},
            "micro_batch_size": args.micro_batch_size, "warmup_steps": args.warmup, "measured_steps": args.steps,
            "flops_per_step": statistics.mean(flops), "layouts": layouts,
            "packed_over_padded_step_time": layouts["packed"]["step_s"] / layouts["padded"]["step_s"]}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny models and sequences (a CPU dry run of the code)")
    parser.add_argument("--micro-batch-size", type=int, default=4, help="samples per step (4: the shipped config)")
    parser.add_argument("--warmup", type=int, default=2, help="steps run before timing")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per layout")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak (TFLOP/s)")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON path (default bench/results/stage1_mfu_<device>[_tiny].json)")
    args = parser.parse_args(argv)
    if args.warmup < 0 or args.steps < 1 or args.micro_batch_size < 1:
        parser.error("--warmup must be >= 0, --steps and --micro-batch-size >= 1")
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    result = run(args)
    output = args.output or RESULTS_DIR / f"stage1_mfu_{args.device}{'_tiny' if args.tiny else ''}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    for layout, numbers in result["layouts"].items():
        mfu = f"{100 * numbers['mfu']:.1f} %" if numbers["mfu"] is not None else "n/a (peak unknown)"
        print(f"{layout:<7} step {numbers['step_s']:.3f} s  non-pad {numbers['non_pad_fraction']:.3f}  "
              f"{numbers['tokens_per_s']:.0f} tokens/s  {numbers['model_tflops_per_s']:.1f} TFLOP/s  MFU {mfu}")
    print(f"packed / padded step time: {result['packed_over_padded_step_time']:.3f}; written {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The engine's overhead: a stage-1 step against the sum of its parts on the same batch, side by side in one run.

    python bench/bench_step_overhead.py [--quick] [--steps N]

Measures on one process (ZeRO-3 engines exactly as training builds them):
- ``stage1``: teacher forward + student forward (KD, CE, alignment; fused KL) + backward + optimizer step;
- ``sft``: student forward (CE only) + backward + optimizer step (``run.stage=sft``'s step);
- ``teacher``: teacher forward alone.
Reports the ratio stage1 / (sft + teacher): 1.0 means distillation costs nothing beyond running both models; the
excess is the KL/alignment terms and the engine's plumbing. Timings interleave the three (A/B/C per repetition) so
machine noise hits all of them alike; medians are reported. Writes bench/results/step_overhead_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kd_pipeline.config import load_config  # noqa: E402
from kd_pipeline.engine.build import build_engines  # noqa: E402
from kd_pipeline.engine.modules import run_teacher  # noqa: E402
from kd_pipeline.prompts import encode_conversation  # noqa: E402
from kd_pipeline.recipes.common import to_device  # noqa: E402
from kd_pipeline.recipes.supervised import loss_terms, stage1_settings  # noqa: E402
from kd_pipeline.runtime import init_runtime, seed_everything  # noqa: E402
from kd_pipeline.tokenizer import train_tokenizer  # noqa: E402

CONVERSATION = [
    {"from": "human", "value": "<image>\n[grounding] Describe the image in detail"},
    {"from": "gpt", "value": "This is an aerial image of a harbour. It shows <p>two red ships</p> "
                             "{<10><20><30><40>|<45>}{<50><60><70><80>|<-10>} and a white storage tank."},
]


def make_batch(engines, micro_batch: int, image_size: int) -> dict:
    sample = encode_conversation(CONVERSATION, engines.tokenizer, image_token_id=engines.image_token_id,
                                 num_image_tokens=engines.num_image_tokens)
    ids = torch.tensor([sample.input_ids] * micro_batch)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([sample.labels] * micro_batch),
            "pixel_values": torch.randn(micro_batch, 3, image_size, image_size)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions")
    parser.add_argument("--steps", type=int, default=20, help="timed repetitions of each step kind")
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny_cpu.yaml"))
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. student.hidden_size=256")
    args = parser.parse_args(argv)
    steps = 4 if args.quick else args.steps
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer_dir = train_tokenizer([CONVERSATION[0]["value"], CONVERSATION[1]["value"]] * 50,
                                        Path(scratch) / "tok", vocab_size=400)
        config = load_config(args.config, [f"data.tokenizer={tokenizer_dir}", f"run.output_dir={scratch}/run",
                                           "run.stage=kd_sft", *args.overrides])
        runtime = init_runtime(5)
        seed_everything(0)
        engines = build_engines(config, runtime)
        batch = to_device(make_batch(engines, config.train.micro_batch_size, config.student.image_size),
                          runtime.device, runtime.dtype)

        def stage1_step():
            terms = loss_terms(engines, batch, config)
            engines.student.backward(terms["loss"])
            engines.student.step()

        def sft_step():
            terms = engines.student(mode="supervised", batch=batch, teacher=None, settings=stage1_settings(config))
            engines.student.backward(terms["loss"])
            engines.student.step()

        def teacher_forward():
            run_teacher(engines.teacher, batch)

        kinds = {"stage1": stage1_step, "sft": sft_step, "teacher": teacher_forward}
        timings: dict[str, list[float]] = {name: [] for name in kinds}
        for repetition in range(steps + 1):
            for name, step in kinds.items():
                if runtime.device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                step()
                if runtime.device.type == "cuda":
                    torch.cuda.synchronize()
                if repetition:  # the first repetition warms up
                    timings[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in timings.items()}
    ratio = medians["stage1"] / (medians["sft"] + medians["teacher"])
    device = torch.cuda.get_device_name() if runtime.device.type == "cuda" else f"cpu ({platform.processor() or 'x86_64'})"
    result = {"device": device, "repetitions": steps, "median_s": medians, "overhead_ratio": ratio,
              "micro_batch": config.train.micro_batch_size, "tokens_per_sample": int(batch["input_ids"].shape[1])}
    print(f"{'step':<10}{'median ms':>12}")
    for name, value in medians.items():
        print(f"{name:<10}{1000 * value:>12.1f}")
    print(f"stage1 / (sft + teacher) = {ratio:.2f}  on {device}")
    out = ROOT / "bench" / "results" / f"step_overhead_{'cuda' if runtime.device.type == 'cuda' else 'cpu'}.json"
    out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Stage 1's token normalisation through the real engines: a step's gradient does not depend on how its tokens fall
into micro-batches (one DeepSpeed ZeRO-3 rank, in a spawned process so this test session keeps no process group)."""

import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as multiprocessing

ROOT = Path(__file__).resolve().parents[2]
# Four samples whose answers have very different lengths: a per-micro-batch mean would weigh their tokens unequally.
ANSWERS = ["Yes.", "A red ship near the harbour, two planes and a white storage tank by the forest lake.",
           "No.", "There are 3 planes."]
VARIANTS = {"one_micro_batch": (4, 1, True), "two_micro_batches": (2, 2, True), "per_micro_mean": (2, 2, False)}


def _batch(engines, first: int, count: int, image_size: int):
    """Samples ``first .. first + count - 1`` (each with its own image), right-padded to the batch's width."""
    from kd_pipeline.prompts import IGNORE_INDEX, encode_conversation

    samples = [encode_conversation([{"from": "human", "value": "<image>\nWhat is in the picture?"},
                                    {"from": "gpt", "value": answer}], engines.tokenizer,
                                   image_token_id=engines.image_token_id, num_image_tokens=engines.num_image_tokens)
               for answer in ANSWERS[first:first + count]]
    width = max(len(sample.input_ids) for sample in samples)
    pad = engines.tokenizer.pad_token_id
    ids = torch.tensor([s.input_ids + [pad] * (width - len(s.input_ids)) for s in samples])
    labels = torch.tensor([s.labels + [IGNORE_INDEX] * (width - len(s.labels)) for s in samples])
    mask = torch.tensor([[1] * len(s.input_ids) + [0] * (width - len(s.input_ids)) for s in samples])
    pixels = torch.stack([torch.randn(3, image_size, image_size, generator=torch.Generator().manual_seed(index))
                          for index in range(first, first + count)])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels}


def _gradients(_rank: int, tokenizer_dir: str, out_dir: str) -> None:
    os.environ["DS_ACCELERATOR"] = "cpu"
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed",
                            category=FutureWarning)  # DeepSpeed's collectives, as kd_pipeline.train filters them
    from deepspeed.utils import safe_get_full_grad

    from kd_pipeline.config import load_config
    from kd_pipeline.engine.build import build_engines
    from kd_pipeline.recipes.supervised import loss_terms, token_denominator
    from kd_pipeline.runtime import init_runtime, seed_everything

    runtime = init_runtime(5)
    for name, (micro, accum, normalised) in VARIANTS.items():
        config = load_config(ROOT / "configs" / "tiny_cpu.yaml", [
            f"data.tokenizer={tokenizer_dir}", f"run.output_dir={out_dir}/{name}", f"train.micro_batch_size={micro}",
            f"train.grad_accum={accum}", "kd.align_weight=0"])  # alignment is a per-micro-batch image-token mean
        seed_everything(0)
        engines = build_engines(config, runtime)
        micro_batches = [_batch(engines, start, micro, config.student.image_size)
                         for start in range(0, len(ANSWERS), micro)]
        denominator = token_denominator(micro_batches, runtime.world_size) if normalised else None
        for index, batch in enumerate(micro_batches):
            engines.student.backward(loss_terms(engines, batch, config, token_count=denominator)["loss"])
            if index < len(micro_batches) - 1:
                engines.student.step()  # DeepSpeed counts micro-steps here; the last one would apply the update
        gradients = {param_name: safe_get_full_grad(param).clone()
                     for param_name, param in engines.student.module.named_parameters() if param.requires_grad}
        torch.save(gradients, f"{out_dir}/{name}.pt")


@pytest.mark.slow
def test_gradient_is_independent_of_the_micro_batch_split(tokenizer_dir, tmp_path):
    multiprocessing.spawn(_gradients, args=(str(tokenizer_dir), str(tmp_path)), nprocs=1, join=True)
    whole, split, per_micro = (torch.load(tmp_path / f"{name}.pt", weights_only=True) for name in VARIANTS)
    assert whole.keys() == split.keys() and len(whole) > 10
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-4, atol=1e-6, msg=name)
    # The check can fail: a mean per micro-batch gives the long answer's tokens less weight.
    differences = [(per_micro[name] - whole[name]).abs().max() / whole[name].abs().max().clamp(min=1e-12)
                   for name in whole if whole[name].abs().max() > 0]
    assert max(differences) > 0.05

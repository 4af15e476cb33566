"""One GeoChat-shaped micro-batch and tiny LLaVA models, for the tests that compare one batch's loss terms and
gradients across layouts (padded vs packed, tests/data/test_packing.py) and devices (CPU vs CUDA, tests/gpu)."""

from __future__ import annotations

import torch

from kd_pipeline.config import ModelConfig
from kd_pipeline.data.samples import EncodedItem
from kd_pipeline.engine.modules import LossSettings, StudentModule, TeacherModule, TeacherOutputs
from kd_pipeline.models import build_model
from kd_pipeline.prompts import IGNORE_INDEX

VOCAB, IMAGE_ID, PAD_ID, BOS_ID, EOS_ID = 64, 63, 0, 1, 2
IMAGE_SIZE, NUM_IMAGE_TOKENS = 28, 4  # 2 x 2 patches of 14 px
STUDENT_HIDDEN, TEACHER_HIDDEN = 32, 48
KD_SETTINGS = {
    "sft": LossSettings(),
    "kd_sft": LossSettings(alpha_kd=0.6, temperature=2.0, align_weight=0.3, fused=True, chunk_size=5),
    "kd_sft_plain_kl": LossSettings(alpha_kd=0.6, temperature=2.0, align_weight=0.3, fused=False),
}
"""The supervised objectives: sft (no teacher), stage 1 with the fused KL (in chunks of 5 tokens) and with the plain
full-logits KL."""


def make_item(index: int, length: int, *, image: bool, generator: torch.Generator) -> EncodedItem:
    """BOS, [image block], prompt (unsupervised), answer + EOS (supervised): a GeoChat-shaped sample."""
    answer = 3 + index % 3
    prompt = length - 1 - answer - 1 - (NUM_IMAGE_TOKENS if image else 0)
    body = torch.randint(3, IMAGE_ID, (prompt + answer,), generator=generator).tolist()
    input_ids = [BOS_ID] + [IMAGE_ID] * (NUM_IMAGE_TOKENS if image else 0) + body + [EOS_ID]
    labels = [IGNORE_INDEX] * (len(input_ids) - answer - 1) + input_ids[-answer - 1:]
    pixels = torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=generator).numpy() if image else None
    return EncodedItem(f"k{index}", input_ids, labels, pixels)


def micro_batch() -> list[EncodedItem]:
    """Six samples whose lengths pack into 4 rows of 20 (first-fit decreasing: [20] [12 8] [11 9] [7])."""
    generator = torch.Generator().manual_seed(0)
    lengths, with_image = [20, 9, 11, 8, 12, 7], [True, False, True, True, False, False]
    return [make_item(index, length, image=image, generator=generator)
            for index, (length, image) in enumerate(zip(lengths, with_image))]


def tiny_model(hidden: int, layers: int, seed: int, attention: str, dtype: torch.dtype = torch.float32,
               device: str = "cpu"):
    """A random tiny LLaVA (the same weights for the same seed on any device: built on CPU, then moved)."""
    torch.manual_seed(seed)
    config = ModelConfig(arch="tiny", hidden_size=hidden, num_layers=layers, num_heads=4, intermediate_size=2 * hidden,
                         vision_hidden_size=16, vision_layers=2, vision_heads=2, image_size=IMAGE_SIZE,
                         patch_size=14, attn_implementation=attention)
    return build_model(config, vocab_size=VOCAB, image_token_id=IMAGE_ID).to(device=device, dtype=dtype)


def student_and_teacher(stage: str, attention: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(StudentModule, TeacherModule or None for sft) of the tiny models."""
    teacher = None
    if stage != "sft":
        teacher = TeacherModule(tiny_model(TEACHER_HIDDEN, 3, seed=1, attention=attention, dtype=dtype, device=device))
        teacher.gather_head(VOCAB)
    student = StudentModule(tiny_model(STUDENT_HIDDEN, 2, seed=0, attention=attention, dtype=dtype, device=device),
                            TEACHER_HIDDEN if teacher is not None else None).to(device=device, dtype=dtype)
    return student, teacher


def loss_and_grads(student: StudentModule, teacher: TeacherModule | None, batch: dict, settings: LossSettings):
    """({term: float}, {parameter name: gradient}) of one micro-batch's supervised objective."""
    student.zero_grad(set_to_none=True)
    teacher_outputs = None
    if teacher is not None:
        teacher_outputs = TeacherOutputs(*teacher(batch), teacher.head_weight)
    terms = student.supervised_terms(batch, teacher_outputs, settings)
    terms["loss"].backward()
    grads = {name: param.grad.clone() for name, param in student.named_parameters() if param.grad is not None}
    return {name: float(value.detach()) for name, value in terms.items()}, grads


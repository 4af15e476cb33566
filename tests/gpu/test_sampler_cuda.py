"""The teacher-mixed sampler on CUDA equals the CPU path on the same seed, in fp32.

CUDA's generator (Philox) and the CPU's (Mersenne Twister) give different numbers for the same seed, so "the same
seed" means the same uniforms: the sampler draws exactly one uniform per row and step (``draw_tokens``), the CUDA
run records them, and the CPU run is fed the very same values. Everything else (both models' forwards with the KV
cache and the image, the mixture, top-k/top-p, the inverse-CDF draw, EOS handling) runs natively on each device.
"""

import pytest
import torch

from kd_pipeline.sampling import sample_mixed
from tests.sampling.conftest import EOS, PAD, VOCAB, _build_llava, _image_prompts

pytestmark = pytest.mark.gpu


class UniformTape:
    """Stands in for ``torch.rand``: records what the real one returns, or replays a recording in order."""

    def __init__(self, real_rand, replay: list[torch.Tensor] | None = None):
        self.real_rand = real_rand
        self.replay = replay
        self.drawn: list[torch.Tensor] = []

    def __call__(self, *shape, generator=None, device=None, dtype=None, **kwargs):
        if self.replay is None:
            values = self.real_rand(*shape, generator=generator, device=device, dtype=dtype, **kwargs)
        else:
            values = self.replay[len(self.drawn)].to(device=device, dtype=dtype)
            assert tuple(values.shape) == tuple(shape[0] if len(shape) == 1 else shape)
        self.drawn.append(values.detach().cpu())
        return values


def rollout(device: str, seed: int, tape: UniformTape, monkeypatch, **sampling):
    student = _build_llava(32, seed=0, eos_bias=1.0).to(device)
    teacher = _build_llava(48, seed=1, eos_bias=1.0, vocab_size=VOCAB + 2).to(device)  # padded teacher vocabulary
    input_ids, attention_mask, pixel_values = (tensor.to(device) for tensor in _image_prompts())
    monkeypatch.setattr(torch, "rand", tape)
    try:
        return sample_mixed(student, teacher, input_ids, attention_mask, pixel_values, mix_alpha=0.3,
                            max_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD,
                            generator=torch.Generator(device=device).manual_seed(seed), check_every=4, **sampling)
    finally:
        monkeypatch.setattr(torch, "rand", tape.real_rand)


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "top_k": 8, "top_p": 0.9}], ids=["pure", "top_k_p"])
def test_cuda_rollout_equals_the_cpu_rollout_on_the_same_uniforms(exact_fp32, monkeypatch, sampling):
    real_rand = torch.rand
    # The first seed whose CUDA rollout has rows stopping at different steps (so EOS handling is exercised).
    for seed in range(10):
        recorded = UniformTape(real_rand)
        on_cuda = rollout("cuda", seed, recorded, monkeypatch, **sampling)
        if len(set(on_cuda.lengths.tolist())) > 1:
            break
    else:
        pytest.fail("no seed in 0..9 gave rows of different lengths: change the models' eos_bias")
    again = rollout("cuda", seed, UniformTape(real_rand), monkeypatch, **sampling)
    assert torch.equal(again.tokens, on_cuda.tokens), "the CUDA sampler is not deterministic for a fixed seed"
    replayed = UniformTape(real_rand, replay=recorded.drawn)
    on_cpu = rollout("cpu", seed, replayed, monkeypatch, **sampling)
    assert len(replayed.drawn) == len(recorded.drawn) == on_cuda.tokens.shape[1]
    assert torch.equal(on_cuda.tokens.cpu(), on_cpu.tokens)
    assert torch.equal(on_cuda.mask.cpu(), on_cpu.mask)
    for field in ("student_logprob", "teacher_logprob", "mixed_logprob"):
        torch.testing.assert_close(getattr(on_cuda, field).cpu(), getattr(on_cpu, field), atol=1e-4, rtol=1e-4,
                                   msg=field)

"""Rollout sampling for stage 2: teacher-mixed ancestral sampling with per-token log-probabilities, decoding with
ZeRO-3 parameters gathered once per rollout phase, and a whole buffer decoded in few large batches."""

from kd_pipeline.sampling.buffer import decode_in_batches
from kd_pipeline.sampling.mixed import MixedRollout, draw_tokens, mixture_log_probs, sample_mixed
from kd_pipeline.sampling.zero3 import gathered_for_decoding

__all__ = ["MixedRollout", "decode_in_batches", "draw_tokens", "gathered_for_decoding", "mixture_log_probs",
           "sample_mixed"]

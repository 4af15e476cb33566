"""Distillation losses: pure tensor functions, fp32 maths, tested against fp64 naive references.

- `kl`: the plain per-token forms on full logits (`token_kl`, `target_logprob`), the reference.
- `fused`: the same values from hidden states and LM-head weights, chunk by chunk, with no
  (tokens x vocab) tensor (`fused_token_kl` per token, `fused_kl_loss` weighted and faster).
- `row_maths` / `triton_kl`: the per-row work of the fused path in torch (CPU) and Triton (CUDA);
  triton is imported only when that backend is used.
- `stage1`: word-level KD + CE (eq. 1-3) and feature alignment with its projector (eq. 4-5).
- `minillm`: the stage-2 policy-gradient terms (imported as `kd_pipeline.losses.minillm`).
"""

from kd_pipeline.losses.fused import (
    FusedKLLoss,
    FusedTokenKL,
    default_chunk_size,
    fused_kl_loss,
    fused_token_kl,
)
from kd_pipeline.losses.kl import target_logprob, token_kl
from kd_pipeline.losses.stage1 import (
    FeatureProjector,
    alignment_loss,
    combine_stage1,
    fused_stage1_loss,
    stage1_kd_terms,
    token_mean_ce,
)

__all__ = [
    "FeatureProjector",
    "FusedKLLoss",
    "FusedTokenKL",
    "alignment_loss",
    "combine_stage1",
    "default_chunk_size",
    "fused_kl_loss",
    "fused_stage1_loss",
    "fused_token_kl",
    "stage1_kd_terms",
    "target_logprob",
    "token_kl",
    "token_mean_ce",
]

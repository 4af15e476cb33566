"""Run by test_triton_kl.py in a fresh process with TRITON_INTERPRET=1 (not collected by pytest).

Triton reads TRITON_INTERPRET when it is first imported, so the interpreter needs a process in
which nothing imported triton before (deepspeed, for one, imports it at import time). This script
loads the inputs the test saved, runs the Triton backend on CPU tensors and saves every output:

    python triton_interpreter_child.py INPUTS.safetensors OUTPUTS.safetensors

Output keys are "<what>|<direction>|<temperature>|<targets or none>|<name>", which the test
parses to recompute the same case with the torch backend.
"""

import itertools
import os
import sys

from safetensors.torch import load_file, save_file


def run_cases(inputs):
    import torch

    from kd_pipeline.losses import fused_kl_loss, fused_token_kl
    from kd_pipeline.losses import triton_kl

    outputs = {}
    for direction, temperature, use_targets in itertools.product(
        ("reverse", "forward"), (1.0, 1.7), (True, False)
    ):
        case = f"{direction}|{temperature}|{'targets' if use_targets else 'none'}"
        targets = inputs["targets"] if use_targets else None

        student_hidden = inputs["student_hidden"].clone().requires_grad_()
        student_weight = inputs["student_weight"].clone().requires_grad_()
        per_token = fused_token_kl(
            student_hidden, student_weight, inputs["teacher_hidden"], inputs["teacher_weight"],
            direction=direction, temperature=temperature, chunk_size=3, targets=targets,
            mask=inputs["mask"], backend="triton",
        )
        objective = (per_token.kl * inputs["grad_kl"]).sum()
        if use_targets:
            objective = objective + (per_token.target_logprob * inputs["grad_logprob"]).sum()
            outputs[f"fused|{case}|target_logprob"] = per_token.target_logprob.detach()
        objective.backward()
        outputs[f"fused|{case}|kl"] = per_token.kl.detach()
        outputs[f"fused|{case}|hidden_grad"] = student_hidden.grad
        outputs[f"fused|{case}|weight_grad"] = student_weight.grad

        student_hidden = inputs["student_hidden"].clone().requires_grad_()
        student_weight = inputs["student_weight"].clone().requires_grad_()
        weighted = fused_kl_loss(
            student_hidden, student_weight, inputs["teacher_hidden"], inputs["teacher_weight"],
            direction=direction, temperature=temperature, chunk_size=4, targets=targets,
            mask=inputs["mask"], kl_weights=inputs["grad_kl"],
            logprob_weights=inputs["grad_logprob"] if use_targets else None, backend="triton",
        )
        weighted.loss.backward()
        outputs[f"weighted|{case}|loss"] = weighted.loss.detach().reshape(1)
        outputs[f"weighted|{case}|hidden_grad"] = student_hidden.grad
        outputs[f"weighted|{case}|weight_grad"] = student_weight.grad

        # the raw kernels with several vocabulary blocks and a partial last one
        student_logits, teacher_logits = inputs["student_logits"], inputs["teacher_logits"]
        row_targets = inputs["row_targets"] if use_targets else None
        stats = triton_kl.row_stats(
            student_logits.clone(), teacher_logits.clone(), row_targets,
            reverse=direction == "reverse", temperature=temperature, block_size=256,
        )
        for name, value in stats._asdict().items():
            if value is not None:
                outputs[f"rows|{case}|{name}"] = value
        outputs[f"rows|{case}|logit_grad"] = triton_kl.row_logit_grad(
            student_logits.clone(), teacher_logits.clone(), row_targets, stats,
            inputs["row_grad_kl"], inputs["row_grad_logprob"] if use_targets else None,
            reverse=direction == "reverse", temperature=temperature, block_size=256,
        )
    return {key: value.detach().contiguous() for key, value in outputs.items()}


def main(argv):
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("set TRITON_INTERPRET=1: this script runs the Triton kernels on CPU")
    inputs_path, outputs_path = argv
    save_file(run_cases(load_file(inputs_path)), outputs_path)


if __name__ == "__main__":
    main(sys.argv[1:])

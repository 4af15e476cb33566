"""Run the real training entry point under torchrun (as operators do) from tests."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train(synth_data: dict, output_dir: Path, overrides: list[str], *, nproc: int = 2, config: str = "tiny_cpu.yaml",
          env: dict | None = None, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               "-m", "kd_pipeline.train", "--config", str(ROOT / "configs" / config),
               f"data.shards={synth_data['shards']}", f"data.tokenizer={synth_data['tokenizer']}",
               f"data.pt_shards={synth_data['pt_shards']}", f"run.output_dir={output_dir}", *overrides]
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run(command, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"training failed ({result.returncode}):\n{result.stderr[-6000:]}"
                             f"{stack_dumps(result.stderr)}")
    return result


def stack_dumps(stderr: str, chars: int = 4000) -> str:
    """The ranks' StepWatchdog dumps (faulthandler's "Timeout (...)!" blocks) that the tail above may have cut: where
    each rank was when a step stalled."""
    starts = [match.start() for match in re.finditer(r"Timeout \(\d", stderr)][:4]
    return "".join(f"\n--- stack dump ---\n{stderr[start:start + chars]}" for start in starts)


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def final_weights(checkpoint: Path) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)

"""Runtime state that is not configuration: rank, world size, device, resolved dtype; process-group start-up;
logging with the rank in every line; seeding and RNG state capture for exact resume.

Rank discovery lives here and only here (``discover_ranks``; ``eval run`` uses it too). Sources, first match wins:

1. ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``: set by ``torchrun``, ``deepspeed`` and ``launch/local_distill.sh``.
2. ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``: one ``srun`` task per rank (``launch/slurm_distill.sh``),
   no launcher in between. The world size is the step's task count (``SLURM_STEP_NUM_TASKS``, else
   ``SLURM_NTASKS``). ``MASTER_ADDR`` defaults to the first host of the step's node list and ``MASTER_PORT`` to
   ``20000 + job id % 20000`` (what the launch script exports as well).
3. Nothing: a plain single process (a one-rank gloo group on a free local port).

GPU binding respects what the process was given: rank ``LOCAL_RANK`` takes the ``LOCAL_RANK``-th *visible* device
(so ``CUDA_VISIBLE_DEVICES=2,3`` puts local ranks 0 and 1 on GPUs 2 and 3), and a process that sees exactly one
device (``srun --gpus-per-task=1`` or ``--gpu-bind`` binds one per task) takes it whatever its local rank.

``record_exit_status`` writes each rank's exit code to ``$KD_STATUS_DIR/rank<r>.rc`` before the process exits:
launchers read it to tell "stopped early after a checkpoint" (75) from a crash, also when ``srun
--kill-on-bad-exit`` ended the slower ranks after the first one exited 75.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    dtype: torch.dtype  # bf16 on GPU, fp32 on CPU

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class RankInfo:
    """Where this process stands in its launch, read from the environment (``discover_ranks``)."""
    rank: int
    world_size: int
    local_rank: int
    source: str  # "torch" (RANK/WORLD_SIZE), "slurm" (SLURM_PROCID/SLURM_NTASKS) or "single"


def _env_int(environ, name: str) -> int:
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"{name}={value!r} is not an integer; the launcher set it wrongly") from None


def discover_ranks(environ=None) -> RankInfo:
    """This process's rank, world size and local rank (see the module docstring for the order of sources)."""
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        info = RankInfo(_env_int(environ, "RANK"), _env_int(environ, "WORLD_SIZE"),
                        _env_int(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else 0, "torch")
    elif "SLURM_PROCID" in environ and ("SLURM_STEP_NUM_TASKS" in environ or "SLURM_NTASKS" in environ):
        tasks = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in environ else "SLURM_NTASKS"
        info = RankInfo(_env_int(environ, "SLURM_PROCID"), _env_int(environ, tasks),
                        _env_int(environ, "SLURM_LOCALID") if "SLURM_LOCALID" in environ else 0, "slurm")
    else:
        return RankInfo(0, 1, 0, "single")
    if not 0 <= info.rank < info.world_size or info.local_rank < 0:
        raise RuntimeError(f"rank {info.rank} (local {info.local_rank}) does not fit a world of {info.world_size} "
                           f"ranks ({info.source} environment); the launcher set it wrongly")
    return info


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list: ``gpu[03-04,07],cpu1`` -> ``gpu03`` (zero padding kept)."""
    match = re.match(r"([^,\[]+)(?:\[(\d+)[^\]]*\])?", nodelist.strip())
    if match is None:
        raise RuntimeError(f"cannot read the node list {nodelist!r}: set MASTER_ADDR")
    return match.group(1) + (match.group(2) or "")


def export_rendezvous(info: RankInfo) -> None:
    """Fill the torch variables ``init_process_group(env://)`` reads, from what ``discover_ranks`` found."""
    if info.source == "single":
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
        return
    os.environ.update(RANK=str(info.rank), WORLD_SIZE=str(info.world_size), LOCAL_RANK=str(info.local_rank))
    if info.source == "slurm":
        nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
        if "MASTER_ADDR" not in os.environ and nodelist:
            os.environ["MASTER_ADDR"] = first_slurm_host(nodelist)
        if "MASTER_PORT" not in os.environ and os.environ.get("SLURM_JOB_ID", "").isdigit():
            os.environ["MASTER_PORT"] = str(20000 + int(os.environ["SLURM_JOB_ID"]) % 20000)


def cuda_device_index(local_rank: int) -> int:
    """The visible CUDA device of ``local_rank``: its own index, or the only device when one is bound per task."""
    visible = torch.cuda.device_count()
    if visible <= 1:  # one bound per task (or none: the caller runs on the CPU)
        return 0
    if local_rank >= visible:
        raise RuntimeError(f"local rank {local_rank} has no GPU: this process sees {visible} devices "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start at most "
                           f"one rank per visible GPU")
    return local_rank


def init_runtime(timeout_minutes: float = 30.0) -> Runtime:
    """Start the process group (nccl on GPU, gloo on CPU) and resolve device and dtype."""
    import deepspeed

    info = discover_ranks()
    export_rendezvous(info)
    use_cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    device = torch.device("cpu")
    if use_cuda:
        device = torch.device("cuda", cuda_device_index(info.local_rank))
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo",
                                   timeout=datetime.timedelta(minutes=timeout_minutes))
    runtime = Runtime(
        rank=torch.distributed.get_rank(), world_size=torch.distributed.get_world_size(), local_rank=info.local_rank,
        device=device, dtype=torch.bfloat16 if use_cuda else torch.float32)
    return runtime


STATUS_DIR_ENV = "KD_STATUS_DIR"


def record_exit_status(rank: int, exit_code: int) -> None:
    """Write ``exit_code`` to ``$KD_STATUS_DIR/rank<rank>.rc`` (nothing when the variable is unset).

    Called once the rank's work is done (after its last checkpoint), so a 75 there means "saved, resume me" even
    if the launcher kills this process a moment later."""
    folder = os.environ.get(STATUS_DIR_ENV)
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / f"rank{rank:05d}.rc").write_text(f"{exit_code}\n")  # a few bytes: one write() call


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def setup_logging(rank: int, level: int = logging.INFO) -> None:
    """Every line carries the rank; ranks other than 0 log warnings and above only (less noise, nothing lost)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RankFilter(rank))
    handler.setFormatter(logging.Formatter("%(asctime)s [rank %(rank)d] %(levelname)s %(name)s: %(message)s",
                                           datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if rank == 0 else max(level, logging.WARNING))
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict:
    """RNG states as tensors and plain types only, so they reload with ``torch.load(weights_only=True)``."""
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[0], random.getstate()[2]],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    python = state["python"]
    random.setstate((python[-2], tuple(python[:-2]), python[-1]))
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])

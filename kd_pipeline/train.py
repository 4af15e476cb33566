"""Train: ``python -m kd_pipeline.train --config FILE [section.key=value ...]``.

Runbook (the same entry point under every launcher):

    # one process (CPU or one GPU)
    python -m kd_pipeline.train --config configs/tiny_cpu.yaml data.shards=data/shards
    # two CPU ranks on this machine (gloo)
    torchrun --standalone --nproc_per_node 2 -m kd_pipeline.train --config configs/tiny_cpu.yaml data.shards=...
    deepspeed --num_gpus 2 --module kd_pipeline.train --config configs/tiny_cpu.yaml data.shards=...
    # a Slurm cluster
    sbatch launch/slurm_distill.sh configs/geochat_13b_to_7b.yaml

Exit codes: 0 finished; 75 stopped early on a signal, the job's end time or ``run.stop_at_step``, after saving
(resume me: run the same command again); 2 bad configuration or input (one line on stderr naming the key or file;
``kd_pipeline.preflight`` checks everything it can before any model is built, then the batch and the shards are
checked against the ranks the launcher started); anything else is a crash. Each rank also records its exit code in
``$KD_STATUS_DIR`` when a launcher sets it (``runtime.record_exit_status``). torchrun
reports any non-zero worker exit as its own exit code 1, so rank 0 also writes ``{run.output_dir}/run_status.json``
(``{"status": "finished"|"stopped_early", "exit_code", "step", "checkpoint"}``: the step and tag of the newest
complete checkpoint) for launchers to read.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from kd_pipeline.config import help_text, load_config
from kd_pipeline.errors import EXIT_USER_ERROR, UserError, report_user_error, user_errors_exit
from kd_pipeline.preflight import check_run

log = logging.getLogger("kd_pipeline.train")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    arguments = sys.argv[1:] if argv is None else argv
    # The config reference (every key's docstring, read from the source) only for --help: it costs 0.1 s per start.
    asks_help = any(argument in ("-h", "--help") for argument in arguments)
    parser = argparse.ArgumentParser(
        prog="python -m kd_pipeline.train", description="Distil a GeoChat teacher into a student (or fine-tune one).",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=help_text() if asks_help else None)
    parser.add_argument("--config", help="run YAML (see configs/); omitted keys keep their defaults")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides applied after the YAML")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(arguments)


def _write_status(config, exit_code: int) -> None:
    import json
    from pathlib import Path

    from kd_pipeline.engine.stopping import RESUME_EXIT_CODE

    latest = Path(config.run.output_dir) / "checkpoints" / "latest"
    tag = latest.read_text().strip() if latest.is_file() else None
    status = {"status": "stopped_early" if exit_code == RESUME_EXIT_CODE else "finished", "exit_code": exit_code,
              "step": int(tag.removeprefix("step_")) if tag else 0, "checkpoint": tag}
    (Path(config.run.output_dir) / "run_status.json").write_text(json.dumps(status, indent=1))


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    # DeepSpeed 0.19 calls torch.distributed collectives that torch 2.13 deprecates, once per call: thousands of
    # identical lines per run that would bury the progress bar and real warnings.
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed", category=FutureWarning)
    args = parse_args(argv)
    from kd_pipeline.engine.stopping import catch_stop_signals

    catch_stop_signals()  # first: a USR1/TERM during the checks or the imports becomes a stop request, not a death
    from kd_pipeline.data.loaders import check_loader_readers, start_worker_server
    from kd_pipeline.plan import check_batch
    from kd_pipeline.runtime import discover_ranks, init_runtime, record_exit_status, setup_logging

    ranks = discover_ranks()  # from the launcher's environment: the batch and the loaders are checked against it
    try:
        config = load_config(args.config, args.overrides)
        check_run(config)  # shards, tokenizer, stage-2 inputs: before the process group, DeepSpeed and any model
        batch = check_batch(config, ranks.world_size)
        check_loader_readers(config, ranks.world_size)
    except UserError:
        record_exit_status(ranks.rank, EXIT_USER_ERROR)
        raise
    if config.data.num_workers:
        start_worker_server()

    runtime = init_runtime(config.deepspeed.timeout_minutes)
    setup_logging(runtime.rank)
    log.info("%s", batch["text"])
    try:
        if config.run.stage == "minillm":
            from kd_pipeline.recipes import minillm as recipe
        else:
            from kd_pipeline.recipes import supervised as recipe
        exit_code = recipe.run(config, runtime)
        record_exit_status(runtime.rank, exit_code)  # first: a launcher may end this process once one rank exits
        if runtime.is_main:
            _write_status(config, exit_code)
        return exit_code
    except (UserError, FileNotFoundError) as error:  # found after start-up (e.g. a damaged resume checkpoint)
        log.error("%s", error)
        record_exit_status(runtime.rank, EXIT_USER_ERROR)
        return report_user_error(error)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())

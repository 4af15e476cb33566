"""Data preparation for kd_pipeline: GeoChat instruction shards, pre-training shards, evaluation sets.

Subcommands (``python -m data_prep <command> --help``): ``shard`` (instruct JSON -> tar shards), ``verify``
(re-check a shard directory), ``bench`` (GeoChat-Bench question files -> normalized evaluation set), ``pt``
(pre-training corpus -> tar shards), ``synth`` (synthetic data) and ``preview``. Each command module exposes
``main(argv: list[str] | None = None) -> int``.
"""

"""Entry point: ``python -m data_prep <command> [options]``; each command lives in its own module.

Modules are imported only when their command runs, so a command whose optional module is absent (``synth``,
``preview``) does not break the others.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from kd_pipeline.errors import user_errors_exit

COMMANDS = {
    "shard": ("data_prep.shard", "instruction data -> train/val tar shards"),
    "verify": ("data_prep.verify", "re-check shards against manifest.json"),
    "bench": ("data_prep.bench", "GeoChat-Bench question files -> normalized evaluation set"),
    "pt": ("data_prep.pt", "pre-training corpus -> pt tar shards"),
    "synth": ("data_prep.synth", "write a small synthetic dataset"),
    "preview": ("data_prep.preview", "show what the model sees for samples of a shard directory"),
    "tokenizer": ("data_prep.tokenizer", "train a small SentencePiece tokenizer on instruction text (tests, demo)"),
}


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    """Dispatch to ``<module>.main(rest_of_argv)`` and return its exit code (a ``UserError`` a command lets escape
    is one line on stderr and exit 2, see ``kd_pipeline.errors``)."""
    parser = argparse.ArgumentParser(
        prog="python -m data_prep",
        description="\n".join(f"  {name:<8} {help_text}" for name, (_, help_text) in COMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=sorted(COMMANDS), help="what to run")
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help="options of the command (see its --help)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    module_name = COMMANDS[args.command][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise
        print(f"error: command {args.command!r} is not available (module {module_name} is missing)", file=sys.stderr)
        return 2
    return module.main(args.arguments)


if __name__ == "__main__":
    sys.exit(main())

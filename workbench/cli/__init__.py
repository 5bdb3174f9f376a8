"""Command line: ``workbench info|trace|generate|demo|export|verify`` (one module per command).

    workbench info PATH            architecture of a checkpoint dir or preset (scout, maverick),
                                   or a summary of a trace store
    workbench trace MODEL --prompts FILE.jsonl --out STORE [--capture router,logits,attention ...]
    workbench generate MODEL --prompts FILE.jsonl --max-new-tokens N [--out STORE] [--answers FILE.jsonl]
    workbench demo                 trace the bundled prompts with the embedded default model
    workbench export STORE --out DIR
    workbench verify STORE         decode every chunk of a trace; one line per problem, exit 1 if damaged
    workbench plan MODEL --gpus 1xH100-80GB --quantize int4 --context 32k   memory plan and verdict

Every error ends in one line ``workbench <command>: error: ...``, never a traceback: exit code 2
for bad input (a flag, a file, a config, a checkpoint, a store), 1 for a failure while working
(I/O error, disk full, an internal error), 130 for Ctrl-C. ``workbench --debug <command> ...``
(or ``--debug`` after the command) lets the exception propagate with its traceback instead.
"""
from __future__ import annotations

import argparse
import os
import sys

# OpenMP threads that wait for each other spin 300,000 times first (libgomp's default): when another
# process holds a core, a 2-thread forward pass then stalls, up to 30x; 1,000 spins cost nothing on an
# idle machine (benchmarks/RESULTS.md, "OpenMP spin-waiting"). Read when torch loads its OpenMP
# runtime: set here, before any command imports torch (the user's own value wins).
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

from workbench.cli import demo, export, generate, info, plan, trace, verify
from workbench.cli._common import CLIError, read_prompts, trace_summary
from workbench.cli.info import describe_model, describe_trace

__all__ = ["main", "build_parser", "describe_model", "describe_trace", "read_prompts", "trace_summary", "CLIError"]


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line, as every other error of the CLI:
    ``workbench <command>: error: <message> (see workbench <command> --help)``, exit code 2
    (``prog`` of a sub-command's parser is "workbench <command>")."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="workbench", description="MoE Workbench: routing analysis for Llama 4 MoE models")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for command in (info, trace, generate, demo, export, verify, plan):
        command.add_parser(sub)
    ap.commands = sub.choices  # the sub-commands' parsers by name: main blames an unknown flag on its command
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    for p in sub.choices.values():  # also accepted after the command; SUPPRESS keeps a value given before it
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)  # argparse reports its own errors (one line, exit 2)
    if unknown:  # parse_args would blame "workbench", not the command whose flags these are not
        parser.commands[args.command].error(
            f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"workbench {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        code, message = _classify(e)
        print(f"workbench {args.command}: error: {message}", file=sys.stderr)
        return code


# OSErrors that say a path given by the user is wrong, not that the machine failed.
_PATH_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


def _classify(e: Exception) -> tuple[int, str]:
    """(exit code, one-line message) of an exception that ended a command.

    Our own error types (CLIError, ConfigError, CheckpointError, ProcessorError, TraceError,
    RecorderError, and an input too long for the model or the machine: ContextLengthError,
    InsufficientMemoryError) describe bad input: 2, unless raised ``from`` a failed write (TraceWriteError)
    or an OSError other than a wrong path (EIO, ENOSPC...): 1. A bare OSError is 2 for a wrong
    path, else 1. Anything else is an internal error: 1, with a pointer to ``--debug``.
    """
    from workbench.checkpoint import CheckpointError
    from workbench.hooks import RecorderError
    from workbench.models.llama4.config import ConfigError
    from workbench.models.llama4.processor import ProcessorError
    from workbench.runtime.memory import ContextLengthError, InsufficientMemoryError
    from workbench.trace import TraceError
    from workbench.trace.errors import TraceWriteError

    chain, c = [], e
    while c is not None and c not in chain:  # e and what it was raised from
        chain.append(c)
        c = c.__cause__
    failed = any(isinstance(c, TraceWriteError) or (isinstance(c, OSError) and not isinstance(c, _PATH_ERRORS))
                 for c in chain)
    if isinstance(e, (CLIError, ConfigError, CheckpointError, ProcessorError, TraceError, RecorderError, OSError,
                      ContextLengthError, InsufficientMemoryError)):  # too long for the model or the machine
        return (1 if failed else 2), _one_line(str(e) or type(e).__name__)
    if isinstance(e, RuntimeError) and "blosc decompression" in str(e):  # a damaged chunk, decoded lazily
        return 2, _one_line(f"a chunk of the trace cannot be decoded ({e}): the store is damaged; `workbench verify "
                            "STORE` lists the damaged arrays and rows")
    return 1, _one_line(f"internal error: {type(e).__name__}: {e} (run again with --debug for the traceback)")


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.splitlines() if part.strip())

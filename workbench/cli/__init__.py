"""Command line: ``workbench info|trace|demo|export`` (one module per command).

    workbench info PATH            architecture of a checkpoint dir or preset (scout, maverick),
                                   or a summary of a trace store
    workbench trace MODEL --prompts FILE.jsonl --out STORE [--capture router,logits,attention ...]
    workbench demo                 trace the bundled prompts with the embedded default model
    workbench export STORE --out DIR

Every user error ends in one line ``workbench <command>: error: ...`` and exit code 2.
"""
from __future__ import annotations

import argparse
import sys

from workbench.cli import demo, export, info, trace
from workbench.cli._common import CLIError, read_prompts, trace_summary
from workbench.cli.info import describe_model, describe_trace

__all__ = ["main", "build_parser", "describe_model", "describe_trace", "read_prompts", "trace_summary", "CLIError"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="workbench", description="MoE Workbench: routing analysis for Llama 4 MoE models")
    sub = ap.add_subparsers(dest="command", required=True)
    for command in (info, trace, demo, export):
        command.add_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    from workbench.checkpoint import CheckpointError
    from workbench.hooks import RecorderError
    from workbench.models.llama4.config import ConfigError
    from workbench.models.llama4.processor import ProcessorError
    from workbench.trace import TraceError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CLIError, ConfigError, CheckpointError, ProcessorError, TraceError, RecorderError,
            FileNotFoundError) as e:
        print(f"workbench {args.command}: error: {e}", file=sys.stderr)
        return 2

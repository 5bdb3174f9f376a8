"""``workbench verify STORE``: decode every chunk of a trace and report each problem on one line."""
from __future__ import annotations

__all__ = ["add_parser", "run"]


def run(args) -> int:
    """Print one line per problem, the notes and a summary; exit 0 when healthy, 1 when damaged
    (a path that is not a trace is a usage error, raised to the CLI: exit 2)."""
    from workbench.trace.verify import verify_trace

    res = verify_trace(args.store)
    for problem in res:
        print(f"problem: {problem}")
    for note in res.notes:
        print(f"note: {note}")
    print(res.summary())
    return 0 if res.ok else 1


def add_parser(sub) -> None:
    p = sub.add_parser("verify", help="check a trace store: every array, chunk and child group over the committed "
                                      "rows is present and decodes (exit 0 healthy, 1 damaged)")
    p.add_argument("store", help="trace store (a directory written by workbench trace / wb.record)")
    p.set_defaults(func=run)

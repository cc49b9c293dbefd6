"""The ``gmmrefine`` command: a dispatcher over the command modules in this package.

Every module ``gmmrefine.cli.<name>`` that defines ``COMMAND`` (the sub-command name), ``HELP`` (one
line), ``add_arguments(parser)`` and ``main(args) -> int`` becomes a sub-command, in the order of
``ORDER`` below; modules are found automatically so adding a command touches only its own file.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import traceback

import gmmrefine
from gmmrefine.errors import EXIT_INPUT_ERROR, InputError

# Order in --help: the data flow a user follows.
ORDER = ["simulate", "reconstruct", "postprocess", "build-gmm", "refine", "hetero", "select", "export", "demo", "info"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default once: appended as ``(default: X)`` unless the help already says it, and
    left out where there is nothing to show (no default, a flag that is off)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS or action.required):
            return text
        return super()._get_help_string(action)


def _command_modules():
    import gmmrefine.cli as pkg

    mods = []
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_") or info.name == "main":
            continue
        mod = importlib.import_module(f"gmmrefine.cli.{info.name}")
        if hasattr(mod, "COMMAND") and hasattr(mod, "main"):
            mods.append(mod)
    rank = {name: i for i, name in enumerate(ORDER)}
    return sorted(mods, key=lambda m: (rank.get(m.COMMAND, len(ORDER)), m.COMMAND))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gmmrefine",
        description="Refine cryo-EM particle poses against Gaussian mixture models "
        "(Chen, Schmid & Chiu, Nat Methods 2024). Start from a RELION or cryoSPARC refinement; "
        "get better poses, maps and a report back.",
    )
    parser.add_argument("--version", action="version", version=f"gmmrefine {gmmrefine.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _command_modules():
        p = sub.add_parser(mod.COMMAND, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP),
                           formatter_class=HelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_main=mod.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_main", None):
        parser.print_help()
        return EXIT_INPUT_ERROR
    from gmmrefine import distributed

    try:
        code = _run(args)
    except SystemExit as err:  # a rank other than 0 leaving with rank 0's exit code
        if not distributed.current().active:
            raise
        code = err.code if isinstance(err.code, int) else 1
    except BaseException:
        if not distributed.current().active:
            raise
        # No collective clean-up after an error: the other ranks may be inside a collective, and the
        # launcher ends them once this process has exited.
        traceback.print_exc()
        _leave(1)
    if distributed.current().active:
        distributed.shutdown()
        _leave(code)
    return code


def _run(args) -> int:
    from gmmrefine import distributed

    try:
        return int(args._main(args) or 0)
    except InputError as err:
        print(f"{_rank_prefix()}gmmrefine {args.command}: error: {err}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except distributed.Interrupted as err:
        if distributed.current().is_main:
            print(f"gmmrefine {args.command}: {err}; resume with the same command and --continue", file=sys.stderr)
        return distributed.EXIT_INTERRUPTED


def _leave(code: int) -> None:
    """End a process of a multi-process run now, without the interpreter's teardown: torch.distributed's
    C++ threads occasionally abort the process there (SIGABRT, "terminate called without an active
    exception"; seen here once in about a dozen 2-process runs, after every output had been written)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _rank_prefix() -> str:
    """``[rank r] `` on ranks other than 0 of a multi-process run (their messages are not rank 0's)."""
    from gmmrefine import distributed

    ctx = distributed.current()
    return f"[rank {ctx.rank}] " if ctx.rank else ""


if __name__ == "__main__":
    sys.exit(main())

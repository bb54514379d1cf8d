"""The ``tesla`` command line: one subcommand per pipeline stage.

Each stage lives in its own module that provides two functions:

* ``configure_parser(parser: argparse.ArgumentParser) -> None`` adds its options;
* ``run(args: argparse.Namespace) -> int`` does the work and returns an exit code.

Modules are imported only when their subcommand is used, so ``tesla --help`` is fast.
A :class:`tesla.errors.TeslaError` raised anywhere becomes a one-line message on
stderr and exit status 2, with no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from tesla import __version__
from tesla.errors import TeslaError

#: subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("tesla.prepare", "convert a raw dataset into class-sorted uint8 HDF5 splits"),
    "zca": ("tesla.zca_fit", "fit ZCA whitening on a prepared training split"),
    "experts": ("tesla.experts", "train one expert network and save its trajectory"),
    "distill": ("tesla.distill", "learn a synthetic set by matching expert trajectories"),
    "evaluate": ("tesla.evaluation", "train fresh networks on a synthetic or random set and test them"),
    "results": ("tesla.results", "collect evaluation runs into acc.csv"),
    "export": ("tesla.export", "export a synthetic set as PNG files or a plain torch tensor file"),
    "report": ("tesla.report", "plots of a distillation: loss and learning-rate curves, image grid"),
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, but not the uninformative ones (None, False, an empty list) nor a flag's
    (``--no-progress`` stores False; the default True of its dest is no value of the flag)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        default = action.default
        empty = isinstance(default, (list, tuple)) and not default
        if default is None or default is False or empty or action.nargs == 0:
            return action.help or ""
        return super()._get_help_string(action)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tesla",
        description="Dataset distillation by trajectory matching at ImageNet scale, with constant memory.",
    )
    parser.add_argument("--version", action="version", version=f"tesla {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        if name != only:
            sub.add_parser(name, help=help_text, add_help=False)
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(
            name,
            help=help_text,
            description=(module.__doc__ or help_text).strip().split("\n\n")[0],
            formatter_class=_HelpFormatter,
        )
        module.configure_parser(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS:
        command = None
    parser = build_parser(only=command)
    args = parser.parse_args(argv)
    if getattr(args, "_module", None) is None:
        parser.print_help()
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    try:
        return int(args._module.run(args) or 0)
    except TeslaError as exc:
        print(f"tesla {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.filename is None:  # not about a path the user gave: a fault to report with its traceback
            raise
        where = exc.filename if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
        print(f"tesla {args.command}: error: {where}: {exc.strerror or exc} (check the path, its permissions "
              "and the free space of its file system)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tesla {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""The options of ``tesla results``, ``tesla report`` and ``tesla export`` come from their
declarations (tesla.settings): parsed into the command's settings object, required and
exclusive options refused by argparse before any file is read."""

from __future__ import annotations

from pathlib import Path

import pytest

from tesla.cli import build_parser
from tesla.export import ExportCommand
from tesla.report import ReportCommand
from tesla.results import ResultsCommand
from tesla.settings import from_args


def parse(argv: list[str]):
    return build_parser(only=argv[0]).parse_args(argv)


def test_results_options_from_the_declaration():
    args = parse(["results", "--runs", "a.csv", "b.csv", "--out", "acc.csv"])
    assert from_args(ResultsCommand, args) == ResultsCommand(runs=[Path("a.csv"), Path("b.csv")], experts=(),
                                                             out=Path("acc.csv"))
    args = parse(["results", "--runs", "a.csv", "--experts", "e0.h5", "e1.h5", "--out", "acc.csv"])
    assert from_args(ResultsCommand, args).experts == [Path("e0.h5"), Path("e1.h5")]


@pytest.mark.parametrize("argv, message", [
    (["results", "--out", "acc.csv"], "the following arguments are required: --runs"),
    (["results", "--runs", "a.csv"], "the following arguments are required: --out"),
    (["export", "--synthetic", "s.h5"], "one of the arguments --png-dir --torch is required"),
    (["export", "--synthetic", "s.h5", "--png-dir", "d", "--torch", "t.pt"], "not allowed with argument"),
    (["export", "--torch", "t.pt"], "the following arguments are required: --synthetic"),
])
def test_missing_or_conflicting_options_are_refused_while_parsing(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_export_and_report_options_from_the_declaration():
    export = from_args(ExportCommand, parse(["export", "--synthetic", "s.h5", "--torch", "t.pt"]))
    assert export == ExportCommand(synthetic="s.h5", png_dir=None, torch_file="t.pt")
    report = from_args(ReportCommand, parse(["report", "--metrics", "m.csv", "--curves", "c.png"]))
    assert report == ReportCommand(metrics=Path("m.csv"), synthetic=None, curves=Path("c.png"), grid=None, title=None)


def _help(command: str) -> str:
    parser = build_parser(only=command)
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return " ".join(sub.format_help().split())


@pytest.mark.parametrize("command, shown, not_shown", [
    # --no-progress stores False: its dest's default True is not the flag's
    ("distill", "--no-progress no progress bar --restart", "no progress bar (default: True)"),
    # no --experts is no file, not the tuple ()
    ("results", "gives the 'full' row --out", "(default: ())"),
])
def test_the_help_shows_no_default_of_a_flag_or_an_empty_list(command, shown, not_shown):
    text = _help(command)
    assert shown in text and not_shown not in text

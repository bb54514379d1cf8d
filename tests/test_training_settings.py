"""The training stages' settings are declared once (tesla.training_settings): `tesla experts`
and `tesla evaluate` parse into the declared defaults, and the config schema's `experts:` and
`evaluate:` blocks and config/README.md's tables are what the declarations generate.

Time budget: about a second (parsers and text only)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from tesla import training_settings as ts
from tesla.cli import build_parser
from tesla.settings import declared, from_args



def _parse(command: str, argv: list[str]) -> argparse.Namespace:
    return build_parser(only=command).parse_args([command, *argv])


def test_tesla_experts_parses_into_the_declared_defaults():
    args = _parse("experts", ["--train", "t.h5", "--test", "v.h5", "--out", "e.h5", "--seed", "3"])
    got = from_args(ts.ExpertConfig, args, out=args.out[0], seed=args.seed[0])
    assert got == ts.ExpertConfig(train=Path("t.h5"), test=Path("v.h5"), out=Path("e.h5"), seed=3)
    assert args.group_mode == "auto" and args.stop_after_epochs is None


def test_tesla_evaluate_parses_into_the_declared_protocol():
    args = _parse("evaluate", ["--random", "--test", "v.h5", "--arch", "convnet", "--out", "o.csv"])
    assert from_args(ts.Protocol, args) == ts.Protocol()
    assert (args.runs, args.seed, args.checkpoint_every, args.lr_random) == (5, 0, ts.DEFAULT_CHECKPOINT_SECONDS, None)


def test_tesla_evaluate_parses_the_subject_and_the_kept_sets_options_as_declared():
    args = _parse("evaluate", ["--kept-sets", "syn.kept", "--validation", "val.h5", "--select", "validation",
                               "--test", "t.h5", "--arch", "distill", "--out", "o.csv"])
    assert from_args(ts.SubjectChoice, args) == ts.SubjectChoice(kept_sets=Path("syn.kept"))
    assert from_args(ts.KeptSetSelection, args) == ts.KeptSetSelection(validation=Path("val.h5"), select="validation")
    plain = _parse("evaluate", ["--synthetic", "s.h5", "--test", "t.h5", "--arch", "distill", "--out", "o.csv"])
    assert from_args(ts.KeptSetSelection, plain) == ts.KeptSetSelection()  # select: final


def test_select_offers_the_rules_of_tesla_selection_and_the_help_lists_the_kept_sets_options(capsys):
    from tesla.selection import SELECT_RULES

    sub = next(a for a in build_parser(only="evaluate")._actions if a.dest == "command").choices["evaluate"]
    select = next(a for a in sub._actions if a.dest == "select")
    assert tuple(select.choices) == SELECT_RULES and select.default == "final"
    with pytest.raises(SystemExit):
        _parse("evaluate", ["--kept-sets", "k", "--select", "test", "--test", "t.h5", "--arch", "distill", "--out", "o"])
    assert "argument --select: invalid choice: 'test'" in capsys.readouterr().err
    text = sub.format_help()
    assert "(--synthetic SYNTHETIC | --kept-sets DIR | --random | --full)" in text
    group = text[text.index("kept sets (with --kept-sets"):]
    assert all(flag in group for flag in ("--validation VAL.h5", "--select {final,validation}", "--sets-out"))


@pytest.mark.parametrize("argv, message", [
    ([], "one of the arguments --synthetic --kept-sets --random --full is required"),
    (["--synthetic", "s.h5", "--kept-sets", "k"], "argument --kept-sets: not allowed with argument --synthetic"),
    (["--random", "--full"], "argument --full: not allowed with argument --random"),
])
def test_tesla_evaluate_takes_exactly_one_subject(argv, message, capsys):
    with pytest.raises(SystemExit):
        _parse("evaluate", [*argv, "--test", "t.h5", "--arch", "convnet", "--out", "o.csv"])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("kept_sets, selection, message", [
    (None, ts.KeptSetSelection(validation=Path("v.h5")), "--validation applies to --kept-sets only; drop it"),
    (None, ts.KeptSetSelection(sets_out=Path("s.csv")), "--sets-out applies to --kept-sets only; drop it"),
    (None, ts.KeptSetSelection(select="validation"), "--select applies to --kept-sets only; drop it"),
    (Path("k"), ts.KeptSetSelection(select="validation"), "--select validation: choose final, or validation together "
                                                          "with --validation VAL.h5"),
])
def test_the_kept_sets_options_are_checked_naming_the_option(kept_sets, selection, message):
    from tesla.errors import TeslaError

    with pytest.raises(TeslaError, match=re.escape(message)):
        selection.check(kept_sets)
    ts.KeptSetSelection(validation=Path("v.h5"), select="validation", sets_out=Path("s.csv")).check(Path("k"))


def test_a_kept_sets_option_without_kept_sets_is_refused_before_any_file_is_read(tmp_path, capsys):
    from tesla.cli import main

    argv = ["evaluate", "--synthetic", str(tmp_path / "missing.h5"), "--test", str(tmp_path / "missing_test.h5"),
            "--arch", "distill", "--out", str(tmp_path / "o.csv"), "--device", "cpu"]
    assert main([*argv, "--sets-out", str(tmp_path / "s.csv")]) == 2
    err = capsys.readouterr().err
    assert "--sets-out applies to --kept-sets only; drop it" in err and "missing" not in err
    assert not list(tmp_path.iterdir())


def test_the_workflow_writes_select_validation_from_the_declaration():
    from tesla.settings import command_options

    assert command_options(ts.KeptSetSelection, {}, result=True, given={"select": "validation"}) == ["--select validation"]
    assert command_options(ts.KeptSetSelection, {}, result=True, given={"select": "final"}) == []


@pytest.mark.parametrize("command, classes", [
    ("experts", (ts.ExpertsCommand,)),
    ("evaluate", (ts.EvaluateCommand, ts.BaselineSubject, ts.SubjectChoice, ts.KeptSetSelection)),
])
def test_every_declared_setting_is_an_option_and_nothing_else_is_declared_twice(command, classes):
    parser = build_parser(only=command)
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    dests = [a.dest for a in sub._actions]
    names = [d.name for cls in classes for d in declared(cls)]
    assert set(names) <= set(dests)
    assert len(dests) == len(set(dests)), "an option is added twice"


def test_the_workflow_only_keys_are_no_options():
    for cls, command in ((ts.ExpertPool, "experts"), (ts.EvaluationTargets, "evaluate")):
        sub = next(a for a in build_parser(only=command)._actions if a.dest == "command").choices[command]
        assert not {d.name for d in declared(cls)} & {a.dest for a in sub._actions}


@pytest.mark.parametrize("changes, message", [
    ({"momentum": 1.0}, "--momentum 1: must be in [0, 1)"),
    ({"momentum": -0.5}, "--momentum -0.5: must be in [0, 1)"),
    ({"weight_decay": -1e-4}, "--weight-decay -0.0001: must be a finite number >= 0"),
    ({"weight_decay": float("nan")}, "--weight-decay nan: must be a finite number >= 0"),
    ({"dsa_strategy": "color_spin"}, "unknown family 'spin'"),
])
def test_the_protocol_refuses_a_bad_optimizer_or_augmentation_before_any_training(changes, message):
    """Protocol.check runs before any network is built (tesla.evaluation.evaluate calls it
    before it reads the test split): a momentum outside [0, 1), a negative weight decay or an
    unknown augmentation family is refused there, not later by the optimizer (torch's
    ValueError) or the training loop."""
    from dataclasses import replace

    from tesla.errors import TeslaError

    with pytest.raises(TeslaError, match=re.escape(message)):
        replace(ts.Protocol(), **changes).check()
    ts.Protocol().check()  # the defaults pass


@pytest.mark.parametrize("command", ["experts", "evaluate"])
def test_the_group_mode_help_says_what_auto_picks_on_each_device(command):
    """``--group-mode auto`` is tesla.group_modes.AUTO_GROUP_MODE: measured on the CPU only."""
    from tesla.group_modes import AUTO_GROUP_MODE

    sub = next(a for a in build_parser(only=command)._actions if a.dest == "command").choices[command]
    [help_text] = [a.help for a in sub._actions if a.dest == "group_mode"]
    assert f"auto: {AUTO_GROUP_MODE['cpu']} on a CPU (measured fastest, docs/benchmarks.md)" in help_text
    assert f"{AUTO_GROUP_MODE['cuda']} on CUDA (not yet measured)" in help_text

"""Every number option of every ``tesla`` stage refuses NaN and infinity when it is parsed,
naming the option, before the stage reads anything; --resolution names its range.

Time budget: a few seconds (parsers only)."""

from __future__ import annotations

import argparse

import pytest

from tesla import cli


def _float_options(stage: str) -> list[str]:
    """The flags of ``stage`` whose values are real numbers (their type reads '0.5' as 0.5)."""
    parser = cli.build_parser(only=stage)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[stage]
    flags = []
    for action in sub._actions:
        if not action.option_strings or action.type is None or action.choices is not None:
            continue
        try:
            value = action.type("0.5")
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            continue
        if isinstance(value, float):
            flags.append(action.option_strings[0])
    return flags


def test_the_stages_have_number_options():
    flags = {stage: _float_options(stage) for stage in cli.COMMANDS}
    assert {"--lr-img", "--lr-lr", "--max-lr", "--lr-teacher"} <= set(flags["distill"])
    assert "--lr" in flags["experts"] and "--eps" in flags["zca"] and "--test-fraction" in flags["prepare"]


@pytest.mark.parametrize("stage", list(cli.COMMANDS))
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
def test_a_non_finite_number_is_refused_naming_the_option(stage, value, capsys):
    for flag in _float_options(stage):
        with pytest.raises(SystemExit) as exc:
            cli.main([stage, f"{flag}={value}"])  # (a bare -inf would read as an option)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {flag}: {value} is not a finite number" in err, err


@pytest.mark.parametrize("value", ["0", "3", "1025", "-8"])
def test_prepare_resolution_outside_its_range_is_refused_when_parsed(value, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["prepare", "demo", "--out-dir", "unused", "--resolution", value])
    assert exc.value.code == 2
    assert f"argument --resolution: {int(value)} is outside the allowed range 4-1024" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-3", "1025"])
def test_prepare_workers_outside_its_range_is_refused_when_parsed(value, capsys):
    """--workers -3 ran with one worker without a word; 0 means every core."""
    with pytest.raises(SystemExit) as exc:
        cli.main(["prepare", "demo", "--out-dir", "unused", "--workers", value])
    assert exc.value.code == 2
    assert f"argument --workers: {int(value)} is outside the allowed range 0-1024" in capsys.readouterr().err


@pytest.mark.parametrize("stage", ["experts", "distill", "evaluate"])
def test_a_negative_seed_is_refused_as_the_config_refuses_it(stage, capsys):
    """The config's seed is >= 0 (seed + k for expert k, seed + r for run r); so is --seed."""
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser(only=stage).parse_args([stage, "--seed", "-1"])
    assert exit_info.value.code == 2
    assert "argument --seed: -1 is outside the allowed range >= 0" in capsys.readouterr().err

"""The training stages' settings are declared once (tesla.training_settings): `tesla experts`
and `tesla evaluate` parse into the declared defaults, and the config schema's `experts:` and
`evaluate:` blocks and config/README.md's tables are what the declarations generate.

Time budget: about a second (parsers and text only)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from tesla import training_settings as ts
from tesla.cli import build_parser
from tesla.settings import declared, from_args

ROOT = Path(__file__).resolve().parents[1]


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


@pytest.mark.parametrize("command, classes", [
    ("experts", (ts.ExpertsCommand,)),
    ("evaluate", (ts.EvaluateCommand, ts.BaselineSubject)),
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


@pytest.mark.parametrize("path, blocks", sorted(ts.BLOCK_FILES.items()))
def test_the_generated_blocks_are_up_to_date(path, blocks):
    for name, block in blocks.items():
        assert block.check(ROOT / path), (
            f"{path}: the {name} block is not what tesla.training_settings generates; run `{block.regenerate}`"
        )

"""One source of truth per setting: every config key that becomes a command-line option has
the command line's default in workflow/schemas/config.schema.yaml, and the schema's bounds
are the stage's own checks (a value the schema allows is accepted by the stage, the nearest
value it refuses is refused by the stage too).

Only the settings written in two places are compared here. The distill row's settings are
declared once (tesla/distill_settings.py): the command line, the schema's keys and the
stage's bound checks are generated from that declaration (tests/test_settings_blocks.py
checks that the committed schema is what it generates), so they are not listed."""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import pytest
import yaml

from tesla.cli import build_parser
from tesla.data.sources.options import RESOLUTION_RANGE
from tesla.errors import TeslaError
from tesla.evaluation import Protocol, checkpoint_path
from tesla.experts import ExpertConfig, _validate

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())

#: (schema section, key) -> (tesla subcommand, argparse dest): the keys passed as options that
#: are written by hand in the schema (the experts: and evaluate: keys are generated from the
#: options' declarations, tesla.training_settings: one default, nothing to compare)
MAPPED = {
    ("dataset", "zca_eps"): ("zca", "eps"),
}

def _resolve(node: dict) -> dict:
    """A schema node with its $ref merged in (the node's own keys win, as the schema's
    defaults sit next to their $ref)."""
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[1]
        return {**_resolve(SCHEMA["$defs"][name]), **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def schema_node(section: str, key: str) -> dict:
    dataset = SCHEMA["$defs"]["dataset"]["properties"]
    if section == "dataset":
        return _resolve(dataset[key])
    return _resolve(dataset[section]["properties"][key])


def cli_default(command: str, dest: str):
    parser = build_parser(only=command)
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    assert any(a.dest == dest for a in sub._actions), f"tesla {command} has no option for {dest}"
    return sub.get_default(dest)


@pytest.mark.parametrize("section, key", sorted(MAPPED))
def test_schema_default_is_the_command_lines(section, key):
    command, dest = MAPPED[(section, key)]
    node = schema_node(section, key)
    assert "default" in node, f"config key {section}.{key} has no default in the schema"
    expected = cli_default(command, dest)
    default = node["default"]
    if isinstance(default, list):  # an engine list; the command line takes one
        default = default[0]
    assert default == expected, (
        f"config key {section}.{key}: schema default {default!r}, `tesla {command}` default {expected!r}"
    )


def _lower_bound(node: dict) -> tuple[float, bool] | None:
    """(bound, inclusive) of a numeric schema node, looking inside anyOf."""
    for option in [node, *[_resolve(o) for o in node.get("anyOf", [])]]:
        if "minimum" in option:
            return option["minimum"], True
        if "exclusiveMinimum" in option:
            return option["exclusiveMinimum"], False
    return None


def _is_integer(node: dict) -> bool:
    return any(o.get("type") == "integer" for o in [node, *[_resolve(o) for o in node.get("anyOf", [])]])


def _experts(**changes) -> None:
    _validate(dataclasses.replace(ExpertConfig(train=Path("t.h5"), test=Path("v.h5"), out=Path("o.h5"), seed=0), **changes))


def _evaluate(**changes) -> None:
    dataclasses.replace(Protocol(epochs=1001), **changes).check()


def _evaluate_checkpoint(seconds: float) -> None:
    checkpoint_path(argparse.Namespace(out=Path("o.csv"), checkpoint=None, checkpoint_every=seconds))


#: (schema section, key) -> how the stage checks a value of it
CHECKED = {
    ("experts", "epochs"): lambda v: _experts(epochs=v),
    ("experts", "lr"): lambda v: _experts(lr=v),
    ("experts", "batch_size"): lambda v: _experts(batch_size=v),
    ("evaluate", "epochs"): lambda v: _evaluate(epochs=v),
    ("evaluate", "lr_decay_epoch"): lambda v: _evaluate(lr_decay_epoch=v),
    ("evaluate", "batch_size"): lambda v: _evaluate(batch_size=v),
    ("evaluate", "lr_random"): lambda v: _evaluate(lr=v),
    ("evaluate", "checkpoint_every"): _evaluate_checkpoint,
}


@pytest.mark.parametrize("section, key", sorted(CHECKED))
def test_schema_lower_bound_is_the_stages(section, key):
    node = schema_node(section, key)
    bound = _lower_bound(node)
    assert bound is not None, f"config key {section}.{key}: no lower bound in the schema"
    value, inclusive = bound
    check = CHECKED[(section, key)]
    if _is_integer(node):
        lowest_ok, highest_refused = (value, value - 1) if inclusive else (value + 1, value)
    else:
        lowest_ok = value if inclusive else math.nextafter(value, math.inf) * 1e6  # a small positive number
        highest_refused = math.nextafter(value, -math.inf) if inclusive else value
    check(lowest_ok)  # accepted by the stage
    with pytest.raises(TeslaError):
        check(highest_refused)


def test_the_resolution_range_is_one_setting():
    from tesla.cli import main

    node = _resolve(SCHEMA["$defs"]["dataset"]["properties"]["resolution"])
    ints = next(o for o in node["anyOf"] if o.get("type") == "integer")
    assert (ints["minimum"], ints["maximum"]) == RESOLUTION_RANGE
    for bad in (RESOLUTION_RANGE[0] - 1, RESOLUTION_RANGE[1] + 1):
        with pytest.raises(SystemExit) as refused:  # refused as the command line is parsed
            main(["prepare", "demo", "--out-dir", "/nonexistent/never-written", "--resolution", str(bad)])
        assert refused.value.code == 2
        assert not Path("/nonexistent/never-written").exists()

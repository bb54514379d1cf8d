"""One source of truth per setting: the config schema's bounds are the stage's own checks (a
value the schema allows is accepted by the stage, the nearest value it refuses is refused by
the stage too).

The settings passed as options are declared once (tesla/distill_settings.py,
tesla/training_settings.py, tesla/zca_settings.py): the command line, the schema's keys and
defaults and the command line's bounds are generated from the declarations
(tests/test_settings_blocks.py checks that the committed schema is what they generate), so
only the checks a stage makes beyond its parser are compared here."""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import pytest
import yaml

from tesla.data.sources.options import RESOLUTION_RANGE
from tesla.errors import TeslaError
from tesla.evaluation import Protocol, checkpoint_path
from tesla.experts import ExpertConfig, _validate

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())


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


def test_a_key_checked_by_a_shared_definition_is_described_in_its_error():
    """`zca_eps` and `keep_every` point at shared definitions (`$ref`) that have no description of
    their own: the error still says what the key is, from the key's own description."""
    from workflow_options import workflow_functions

    ns = workflow_functions(yaml.safe_load((ROOT / "config" / "config.yaml").read_text()))
    bad = {"datasets": {"demo": {"source": "demo", "zca_eps": -1, "distill": {"1": {"keep_every": 0, "select": "validation"}}}}}
    lines = ns["_schema_errors"](bad)
    assert any(line.startswith("config key datasets.demo.zca_eps: -1 is less than or equal to the minimum of 0 "
                               "(regulariser eps of the ZCA whitening") for line in lines), lines
    assert any(line.startswith("config key datasets.demo.distill.1.keep_every: 0 is less than the minimum of 1 (with "
                               "select: validation") for line in lines), lines

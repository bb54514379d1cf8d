"""One source of truth per setting (issue 15, item 3): every config key that becomes a
command-line option has the command line's default in workflow/schemas/config.schema.yaml,
and the schema's bounds are the stage's own checks (a value the schema allows is accepted
by the stage, the nearest value it refuses is refused by the stage too)."""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import pytest
import yaml

from tesla.cli import build_parser
from tesla.data.sources.options import RESOLUTION_RANGE
from tesla.distill import DistillSettings, check_settings
from tesla.errors import TeslaError
from tesla.evaluation import Protocol, checkpoint_path
from tesla.experts import ExpertConfig, _validate

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())

#: (schema section, key) -> (tesla subcommand, argparse dest): the keys passed as options that
#: are written by hand in the schema (the experts: and evaluate: keys are generated from the
#: options' declarations, tesla.training_settings: one default, nothing to compare)
MAPPED = {
    ("distill", "syn_steps"): ("distill", "syn_steps"),
    ("distill", "expert_epochs"): ("distill", "expert_epochs"),
    ("distill", "max_start_epoch"): ("distill", "max_start_epoch"),
    ("distill", "lr_img"): ("distill", "lr_img"),
    ("distill", "lr_img_convention"): ("distill", "lr_img_convention"),
    ("distill", "lr_lr"): ("distill", "lr_lr"),
    ("distill", "lr_teacher"): ("distill", "lr_teacher"),
    ("distill", "batch_syn"): ("distill", "batch_syn"),
    ("distill", "iterations"): ("distill", "iterations"),
    ("distill", "soft_labels"): ("distill", "soft_labels"),
    ("distill", "label_temperature"): ("distill", "label_temperature"),
    ("distill", "lr_label"): ("distill", "lr_label"),
    ("distill", "min_start_epoch"): ("distill", "min_start_epoch"),
    ("distill", "max_start_epoch_final"): ("distill", "max_start_epoch_final"),
    ("distill", "window_iterations"): ("distill", "window_iterations"),
    ("distill", "init"): ("distill", "init"),
    ("distill", "init_expert"): ("distill", "init_expert"),
    ("distill", "init_epoch"): ("distill", "init_epoch"),
    ("distill", "dsa"): ("distill", "dsa"),
    ("distill", "checkpoint_every"): ("distill", "checkpoint_every"),
    ("distill", "max_lr"): ("distill", "max_lr"),
    ("distill", "max_image_growth"): ("distill", "max_image_growth"),
    ("distill", "max_loss"): ("distill", "max_loss"),
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
    if section == "distill":
        return _resolve(SCHEMA["$defs"]["distill_settings"]["properties"][key])
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


def test_the_engine_default_is_the_command_lines():
    node = _resolve(SCHEMA["$defs"]["distill_settings"]["properties"]["engine"])
    default = node["default"]
    assert (default if isinstance(default, str) else default[0]) == cli_default("distill", "engine")


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


def _distill(**changes) -> None:
    check_settings(dataclasses.replace(DistillSettings(train="t.h5", experts=["e.h5"], out="o.h5", ipc=1), **changes))


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
    ("distill", "syn_steps"): lambda v: _distill(syn_steps=v),
    ("distill", "expert_epochs"): lambda v: _distill(expert_epochs=v),
    ("distill", "max_start_epoch"): lambda v: _distill(max_start_epoch=v),
    ("distill", "lr_img"): lambda v: _distill(lr_img=v),
    ("distill", "lr_lr"): lambda v: _distill(lr_lr=v),
    ("distill", "lr_teacher"): lambda v: _distill(lr_teacher=v, min_lr=min(v, 1e-3) if v > 0 else None),
    ("distill", "batch_syn"): lambda v: _distill(batch_syn=v),
    ("distill", "iterations"): lambda v: _distill(iterations=v),
    ("distill", "checkpoint_every"): lambda v: _distill(checkpoint_every=v),
    ("distill", "label_temperature"): lambda v: _distill(label_temperature=v),
    ("distill", "lr_label"): lambda v: _distill(lr_label=v),
    ("distill", "min_start_epoch"): lambda v: _distill(min_start_epoch=v),
    ("distill", "window_iterations"): lambda v: _distill(max_start_epoch_final=30, window_iterations=v),
    ("distill", "max_image_growth"): lambda v: _distill(max_image_growth=v),
    ("distill", "max_loss"): lambda v: _distill(max_loss=v),
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

"""The workflow's ``--tracker*`` options are those earlier workflows wrote.

:func:`tesla.tracking.workflow_options` turns the config's ``tracking`` block into a job's
options. Its strings for a grid of blocks (no tracker; TensorBoard with and without a folder;
W&B at its defaults, with each key set, with empty and null values, and the block as the
schema's defaults fill it in) x stages (experts, distill, evaluate) x outputs (each stage's
outputs under results/, and paths outside it) are recorded in tests/tracking_options.json,
as the workflow wrote them before the tracking settings were declared once
(tesla.tracking_settings: TrackerOptions, TrackingBlock). The options are run options, so a
change would rerun nothing; they are kept equal anyway, so that a job's tracker run stays
where it was. To record anew (only where a change of the strings is decided on):

    python tests/test_tracking_options.py --record

The ``tracking:`` block of workflow/schemas/config.schema.yaml, generated from the declarations
(tesla.tracking_settings.TrackingBlock), is the one written by hand before: its keys, types,
defaults, enums, references and ``additionalProperties: false`` are recorded in
tests/tracking_schema.json (descriptions without their trailing newline); ``--record`` records
the schema file's block too. The ``--tracker*`` options of the three stages that train keep
their flags, defaults, choices, metavars and help, now parsed from their declaration
(tesla.tracking_settings.TrackerOptions).

Time budget: about a second (three stages' parsers, which import torch).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tesla.settings import declared, schema_properties
from tesla.tracking import from_args, workflow_options
from tesla.tracking_settings import GROUP_TITLE, TRACKERS, TrackerOptions, TrackingBlock

ROOT = Path(__file__).resolve().parents[1]
RECORD = Path(__file__).with_name("tracking_options.json")
SCHEMA_RECORD = Path(__file__).with_name("tracking_schema.json")
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"

_WANDB_DEFAULTS = {"project": "tesla", "entity": None, "group": None, "mode": "offline", "dir": "results"}

#: (name, the config's tracking block)
BLOCKS: dict[str, dict] = {
    "empty": {},
    "none": {"tracker": "none"},
    "null": {"tracker": None},
    "schema-defaults": {"tracker": "none", "tensorboard": {"dir": None}, "wandb": dict(_WANDB_DEFAULTS)},
    "tensorboard": {"tracker": "tensorboard"},
    "tensorboard-null-block": {"tracker": "tensorboard", "tensorboard": None},
    "tensorboard-dir-null": {"tracker": "tensorboard", "tensorboard": {"dir": None}},
    "tensorboard-dir-empty": {"tracker": "tensorboard", "tensorboard": {"dir": ""}},
    "tensorboard-dir-relative": {"tracker": "tensorboard", "tensorboard": {"dir": "tb"}},
    "tensorboard-dir-absolute": {"tracker": "tensorboard", "tensorboard": {"dir": "/scratch/tb/"}},
    "tensorboard-with-wandb-keys": {"tracker": "tensorboard", "tensorboard": {"dir": "tb"},
                                    "wandb": {**_WANDB_DEFAULTS, "group": "g", "entity": "e"}},
    "wandb": {"tracker": "wandb"},
    "wandb-null-block": {"tracker": "wandb", "wandb": None},
    "wandb-schema-defaults": {"tracker": "wandb", "tensorboard": {"dir": None}, "wandb": dict(_WANDB_DEFAULTS)},
    "wandb-empty-values": {"tracker": "wandb", "wandb": {"project": "", "entity": "", "group": "", "mode": "",
                                                         "dir": ""}},
    "wandb-project": {"tracker": "wandb", "wandb": {**_WANDB_DEFAULTS, "project": "mine"}},
    "wandb-entity": {"tracker": "wandb", "wandb": {**_WANDB_DEFAULTS, "entity": "team"}},
    "wandb-group": {"tracker": "wandb", "wandb": {**_WANDB_DEFAULTS, "group": "all-jobs"}},
    "wandb-online": {"tracker": "wandb", "wandb": {**_WANDB_DEFAULTS, "mode": "online"}},
    "wandb-dir": {"tracker": "wandb", "wandb": {**_WANDB_DEFAULTS, "dir": "/scratch/runs"}},
    "wandb-everything": {"tracker": "wandb", "tensorboard": {"dir": "tb"},
                         "wandb": {"project": "p", "entity": "e", "group": "g", "mode": "online", "dir": "d"}},
}
STAGES = ("experts", "distill", "evaluate")
OUTPUTS = (
    "results/demo/experts/split/expert_0.h5",
    "results/demo/experts/none-zca/expert_3.h5",
    "results/demo_ipc1/exact/synthetic.h5",
    "results/cifar10_ipc10/tesla/synthetic.h5",
    "results/demo_ipc1/eval/exact_convnet.csv",
    "results/demo_ipc50/eval/random_convnet_d2.csv",
    "elsewhere/demo_ipc1/exact/synthetic.h5",
    "synthetic.h5",
    "results/synthetic.h5",
    "results",
)


def all_options() -> dict[str, list[str]]:
    """The options of every block x stage x output, by '<block> <stage> <output>'."""
    return {f"{name} {stage} {out}": workflow_options(block, stage, out)
            for name, block in BLOCKS.items() for stage in STAGES for out in OUTPUTS}


def test_the_record_covers_every_case():
    assert sorted(json.loads(RECORD.read_text())) == sorted(all_options())


def test_the_workflow_writes_the_recorded_tracker_options():
    recorded, generated = json.loads(RECORD.read_text()), all_options()
    differ = {k: (recorded.get(k), generated.get(k)) for k in {*recorded, *generated}
              if recorded.get(k) != generated.get(k)}
    assert not differ, f"(recorded, generated) differ: {differ}"


@pytest.mark.parametrize("stage", STAGES)
def test_the_record_has_every_kind_of_option(stage):
    """The grid reaches each branch: no options, TensorBoard's folder, every W&B option."""
    recorded = json.loads(RECORD.read_text())
    flags = {option.split()[0] for key, options in recorded.items() if f" {stage} " in key for option in options}
    assert flags == {"--tracker", "--tracker-dir", "--tracker-project", "--tracker-group", "--tracker-mode",
                     "--tracker-entity"}
    assert any(not options for key, options in recorded.items() if f" {stage} " in key)


# --------------------------------------------------------------------------------------
# the schema's block
# --------------------------------------------------------------------------------------
def _plain(schema: object) -> object:
    """A schema with its descriptions' trailing whitespace dropped (YAML's '>' keeps a newline)."""
    if isinstance(schema, dict):
        return {k: v.rstrip() if k == "description" and isinstance(v, str) else _plain(v) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_plain(v) for v in schema]
    return schema


def schema_tracking_block() -> dict:
    return _plain(yaml.safe_load(SCHEMA.read_text())["properties"]["tracking"])


def test_the_schema_tracking_block_is_the_one_written_by_hand_before():
    assert schema_tracking_block() == json.loads(SCHEMA_RECORD.read_text())


def test_the_schema_tracking_keys_are_the_declarations():
    assert schema_tracking_block()["properties"] == _plain(schema_properties(TrackingBlock))


def test_the_config_keys_take_the_options_defaults_and_choices():
    """One home for the tracker names, the W&B project and mode: the option's declaration."""
    options = {d.name: d for d in declared(TrackerOptions)}
    wandb = schema_tracking_block()["properties"]["wandb"]["properties"]
    assert wandb["project"]["default"] == options["tracker_project"].default == "tesla"
    assert wandb["mode"]["default"] == options["tracker_mode"].default == "offline"
    assert wandb["mode"]["enum"] == list(options["tracker_mode"].setting.choices)
    tracker = schema_tracking_block()["properties"]["tracker"]
    assert tracker["enum"] == ["none", *options["tracker"].setting.choices] == ["none", *TRACKERS]


# --------------------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------------------
#: the options as they were written by hand: flag -> (default, choices, metavar)
CLI = {
    "--tracker": (None, ("tensorboard", "wandb"), None),
    "--tracker-dir": (None, None, "DIR"),
    "--tracker-project": ("tesla", None, None),
    "--tracker-entity": (None, None, None),
    "--tracker-group": (None, None, None),
    "--tracker-mode": ("offline", ("offline", "online"), None),
    "--tracker-name": (None, None, None),
}


def _stage_parser(stage: str):
    from tesla.cli import build_parser

    parser = build_parser(stage)
    return next(a for a in parser._actions if a.dest == "command").choices[stage]


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_has_the_tracker_options_as_before(stage):
    parser = _stage_parser(stage)
    group = next(g for g in parser._action_groups if g.title == GROUP_TITLE)
    found = {a.option_strings[0]: (a.default, tuple(a.choices) if a.choices else None, a.metavar)
             for a in group._group_actions}
    assert found == CLI
    assert [a.option_strings[0] for a in group._group_actions] == list(CLI)  # the --help order


def test_the_options_parse_into_their_declaration():
    parser = _stage_parser("distill")
    base = ["--train", "t.h5", "--experts", "e.h5", "--out", "o.h5", "--ipc", "1"]
    assert from_args(parser.parse_args(base)) == TrackerOptions()
    given = parser.parse_args([*base, "--tracker", "wandb", "--tracker-dir", "d", "--tracker-project", "p",
                               "--tracker-entity", "e", "--tracker-group", "g", "--tracker-mode", "online",
                               "--tracker-name", "n"])
    assert from_args(given) == TrackerOptions(tracker="wandb", tracker_dir="d", tracker_project="p",
                                              tracker_entity="e", tracker_group="g", tracker_mode="online",
                                              tracker_name="n")
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--tracker-mode", "later"])


def test_the_declarations_load_no_torch_and_no_tracker_package():
    """The workflow imports them while it builds the job graph; a tracker is imported when used."""
    code = ("import sys, tesla.tracking, tesla.tracking_settings, tesla.settings_blocks\n"
            "print(sorted(m for m in ('torch', 'tensorboard', 'wandb') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    RECORD.write_text(json.dumps(all_options(), indent=1, sort_keys=True) + "\n")
    SCHEMA_RECORD.write_text(json.dumps(schema_tracking_block(), indent=1) + "\n")
    print(f"recorded {RECORD}, {SCHEMA_RECORD}")

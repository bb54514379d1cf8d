"""The workflow's ``--tracker*`` options are those earlier workflows wrote.

:func:`tesla.tracking.workflow_options` turns the config's ``tracking`` block into a job's
options. Its strings for a grid of blocks (no tracker; TensorBoard with and without a folder;
W&B at its defaults, with each key set, with empty and null values, and the block as the
schema's defaults fill it in) x stages (experts, distill, evaluate) x outputs (each stage's
outputs under results/, and paths outside it) are recorded in tests/tracking_options.json,
as the workflow wrote them before the tracking settings were declared once
(tesla.tracking.TrackerOptions, tesla.tracking_settings). The options are run options, so a
change would rerun nothing; they are kept equal anyway, so that a job's tracker run stays
where it was. To record anew (only where a change of the strings is decided on):

    python tests/test_tracking_options.py --record

Time budget: well under a second.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tesla.tracking import workflow_options

RECORD = Path(__file__).with_name("tracking_options.json")

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
    differ = {k: (recorded.get(k), generated.get(k)) for k in {*recorded, *generated} if recorded.get(k) != generated.get(k)}
    assert not differ, f"(recorded, generated) differ: {differ}"


@pytest.mark.parametrize("stage", STAGES)
def test_the_record_has_every_kind_of_option(stage):
    """The grid reaches each branch: no options, TensorBoard's folder, every W&B option."""
    recorded = json.loads(RECORD.read_text())
    flags = {option.split()[0] for key, options in recorded.items() if f" {stage} " in key for option in options}
    assert flags == {"--tracker", "--tracker-dir", "--tracker-project", "--tracker-group", "--tracker-mode",
                     "--tracker-entity"}
    assert any(not options for key, options in recorded.items() if f" {stage} " in key)


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    RECORD.write_text(json.dumps(all_options(), indent=1, sort_keys=True) + "\n")
    print(f"recorded {RECORD}")

"""The workflow's command lines of the training stages are those earlier workflows wrote.

The params of the experts, evaluate and random-baseline jobs (and the run options of the
experts and evaluate jobs) are recorded in tests/training_options.json, as the workflow wrote
them before they were generated from the stages' declarations (tesla.training_settings): for
every dataset of every shipped config (config/*.yaml), and for hand-made variants of the
demo that set the keys the shipped configs leave at their defaults (numerics, the decay
epoch and momentum reset, kept snapshots, train_to_end, the input space, group mode,
checkpoint interval). A job's params changing would rerun every existing job of that kind,
so a generated string must equal the recorded one exactly. (The ZCA jobs' params, for every
dataset of every shipped config and every normalisation, are tests/test_zca_options.py's.)

The functions are those of workflow/rules/common.smk, run here as plain Python on a config
that Snakemake's validation (with the schema's defaults) has filled in (tests/workflow_options.py). To record anew
(only where a change of the strings is decided on):

    python tests/test_training_options.py --record

Time budget: about a second.
"""

from __future__ import annotations

import copy
import sys
from argparse import Namespace
from pathlib import Path

import yaml

from workflow_options import ROOT, recorded_strings_tests, workflow_functions, write_record

RECORD = Path(__file__).with_name("training_options.json")

#: hand-made variants of the shipped config's demo entry: (name, {section: {key: value}})
VARIANTS: dict[str, dict] = {
    "numerics-on": {"experts": {"precision": "bf16", "tf32": True, "channels_last": True},
                    "evaluate": {"precision": "bf16", "tf32": True, "channels_last": True}},
    "numerics-off": {"experts": {"tf32": False, "channels_last": False},
                     "evaluate": {"tf32": False, "channels_last": False}},
    "published-protocol": {"evaluate": {"epochs": 1001, "lr_decay_epoch": 502, "reset_momentum_at_decay": True,
                                        "lr_random": 0.02, "runs": 3, "batch_size": 128}},
    "kept-snapshots": {"experts": {"keep_snapshots": 8, "train_to_end": True, "dtype": "float16", "lr": 0.02,
                                   "batch_size": 64, "dsa": "color_crop"}},
    "kept-auto": {"experts": {"keep_snapshots": "auto", "epochs": 40}},
    "kept-all-train-to-end": {"experts": {"keep_snapshots": None, "train_to_end": True}},
    "grouped": {"experts": {"group_mode": "vmap", "per_job": 2}, "evaluate": {"group_mode": "sequential",
                                                                              "checkpoint_every": 60}},
    "normalize-none-zca": {"dataset": {"normalize": "none", "zca": True, "zca_eps": 0.05}},
    "normalize-published": {"dataset": {"normalize": "mnist"}},
    "normalize-split-zca": {"dataset": {"zca": True}},
}


def shipped_configs() -> dict[str, dict]:
    return {path.name: yaml.safe_load(path.read_text()) for path in sorted((ROOT / "config").glob("*.yaml"))}


def variant_config(changes: dict) -> dict:
    """The shipped config with only the demo entry, changed as ``changes`` says."""
    config = copy.deepcopy(shipped_configs()["config.yaml"])
    demo = config["datasets"]["demo"]
    config["datasets"] = {"demo": demo}
    config["default_datasets"] = ["demo"]
    for section, values in changes.items():
        (demo if section == "dataset" else demo.setdefault(section, {})).update(values)
    return config


def option_strings(config: dict) -> dict[str, str]:
    """Every training-stage command line the workflow writes for ``config``, by a readable key."""
    f = workflow_functions(config)
    out: dict[str, str] = {}
    for name, ds in f["config"]["datasets"].items():
        for space in f["spaces_of"](ds):
            w = Namespace(dataset=name, space=space)
            out[f"{name}/experts/{space}"] = f["expert_options"](w)
            outputs = [f"results/{name}/experts/{space}/expert_{k}.h5" for k in (0, 1)]
            out[f"{name}/experts/{space}/run"] = f["expert_run_options"](w, outputs)
        for ipc in ds["distill"]:
            for arch in [*ds["evaluate"]["architectures"], "distill"]:
                w = Namespace(dataset=name, ipc=ipc, arch=arch)
                out[f"{name}/evaluate/{ipc}/{arch}"] = f["evaluate_options"](w)
                out[f"{name}/random/{ipc}/{arch}"] = f["random_baseline_options"](w)
                output = [f"results/{name}_ipc{ipc}/eval/random_{arch}.csv"]
                out[f"{name}/evaluate/{ipc}/{arch}/run"] = f["evaluate_run_options"](w, output)
    return out


def all_strings() -> dict[str, dict[str, str]]:
    cases = {f"config/{name}": config for name, config in shipped_configs().items()}
    cases.update({f"variant/{name}": variant_config(changes) for name, changes in VARIANTS.items()})
    return {case: option_strings(config) for case, config in cases.items()}


generated, test_the_record_covers_every_case, test_the_workflow_writes_the_recorded_strings = (
    recorded_strings_tests(RECORD, all_strings))


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    write_record(RECORD, all_strings())

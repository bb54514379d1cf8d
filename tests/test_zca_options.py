"""The ZCA jobs' params are those earlier workflows wrote.

A zca job's options (``zca_options`` of workflow/rules/common.smk: the normalisation it is
fitted after and the dataset's ``zca_eps``) are its params and go into the ``upstream``
fingerprint of every job that reads its file: a change of the string reruns every ZCA fit,
and the experts, distillations and evaluations after it. The strings are recorded in
tests/zca_options.json, as the workflow wrote them before they were generated from the
declaration of ``tesla zca``'s settings (tesla.zca_settings): for every dataset of every
shipped config (config/*.yaml) and every normalisation (not only the configured ones), and
for the demo with ``zca_eps`` spelt in the ways a config may spell it (a float, an integer,
an exponent). To record anew (only where a change of the strings is decided on)::

    python tests/test_zca_options.py --record

Time budget: about a second.
"""

from __future__ import annotations

import copy
import sys
from argparse import Namespace
from pathlib import Path

import yaml

from tesla.normalizations import NORMALIZATIONS
from workflow_options import ROOT, recorded_strings_tests, workflow_functions, write_record

RECORD = Path(__file__).with_name("zca_options.json")

#: values of the demo's zca_eps beside the shipped configs' (as YAML reads them)
EPS_VARIANTS = {"default": None, "float": 0.05, "integer": 2, "exponent": 1.0e-3, "large": 10.0, "tiny": 1.0e-07}


def _configs() -> dict[str, dict]:
    out = {}
    for path in sorted((ROOT / "config").glob("*.yaml")):
        out[f"config/{path.name}"] = yaml.safe_load(path.read_text())
    demo_config = out["config/config.yaml"]
    for name, eps in EPS_VARIANTS.items():
        config = copy.deepcopy(demo_config)
        config["datasets"] = {"demo": config["datasets"]["demo"]}
        config["default_datasets"] = ["demo"]
        config["datasets"]["demo"].pop("zca_eps", None)
        if eps is not None:
            config["datasets"]["demo"]["zca_eps"] = eps
        out[f"variant/eps-{name}"] = config
    return out


def zca_strings(config: dict) -> dict[str, str]:
    """``zca_options`` of every dataset of ``config`` and every normalisation."""
    functions = workflow_functions(config)
    return {f"{dataset}/{normalize}": functions["zca_options"](Namespace(dataset=dataset, normalize=normalize))
            for dataset in functions["config"]["datasets"] for normalize in NORMALIZATIONS}


def all_strings() -> dict[str, dict[str, str]]:
    return {case: zca_strings(config) for case, config in _configs().items()}


generated, test_the_record_covers_every_case, test_the_workflow_writes_the_recorded_strings = (
    recorded_strings_tests(RECORD, all_strings))


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    write_record(RECORD, all_strings())

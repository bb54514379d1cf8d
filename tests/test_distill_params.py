"""The distill jobs' params do not change when their settings move: the options string
(``params.options``, a rerun trigger) and the run options (``params.run``) of every distill
job of config/config.yaml and of hand-made rows (learned labels, a moving window,
real-correct, dsa, batch_syn, the step-size convention, boolean soft_labels, the guard's
limits) equal the strings recorded in tests/distill_params.json from the workflow as it was
before the distill settings were declared once. A changed string would rerun every existing
distillation of that row.

Time budget: about a second (common.smk's functions run outside Snakemake)."""

from __future__ import annotations

import json

import pytest
import yaml

from workflow_options import ROOT, distill_strings, hand_made_config

FIXTURE = json.loads((ROOT / "tests" / "distill_params.json").read_text())
BASE = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
CONFIGS = {"config/config.yaml": BASE, "hand_made": hand_made_config(BASE, FIXTURE["hand_made"])}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_distill_params_are_the_recorded_ones(name):
    assert distill_strings(CONFIGS[name]) == FIXTURE["strings"][name]


def test_the_fixture_covers_every_row_of_the_shipped_config():
    def engines(row):  # one name or a list; the schema's default is [exact]
        engine = row.get("engine", ["exact"])
        return [engine] if isinstance(engine, str) else engine

    jobs = {f"{d}/{ipc}/{e}" for d, ds in BASE["datasets"].items() for ipc, row in ds["distill"].items() for e in engines(row)}
    assert set(FIXTURE["strings"]["config/config.yaml"]) == jobs

"""The workflow's option strings of a config, computed by workflow/rules/common.smk's own
functions outside Snakemake: common.smk (and tracking.smk) run in a namespace whose
``workflow`` is a stand-in that knows the workflow's folder, after the config has been
validated and filled as Snakemake does. Used to check that the jobs' params stay what they
were (tests/test_distill_params.py, test_training_options.py, test_zca_options.py), and the
records those checks compare with: {case: {key: option string}} in a JSON file."""

from __future__ import annotations

import copy
import json
from argparse import Namespace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "workflow" / "rules"


def workflow_functions(cfg: dict) -> dict[str, Any]:
    """common.smk's and tracking.smk's names, run on a copy of ``cfg`` (validated, filled)."""
    stand_in = _Workflow(basedir=str(ROOT / "workflow"), resource_settings=SimpleNamespace(overwrite_resources={}, overwrite_threads={}, default_resources=None))
    namespace: dict[str, Any] = {"workflow": stand_in, "config": copy.deepcopy(cfg), "__name__": "common_smk"}
    for name in ("common.smk", "tracking.smk"):
        path = RULES / name
        exec(compile(path.read_text(encoding="utf-8"), str(path), "exec"), namespace)  # noqa: S102
    return namespace


def distill_strings(cfg: dict) -> dict[str, dict[str, str]]:
    """{"<dataset>/<ipc>/<engine>": {"options": the params' options, "run": the run options}}
    of every distill job the config describes."""
    ns = workflow_functions(cfg)
    out = {}
    for dataset, ds in ns["config"]["datasets"].items():
        for ipc, row in ds["distill"].items():
            for engine in row["engine"]:
                w = Namespace(dataset=dataset, ipc=ipc, engine=engine)
                synthetic = f"results/{dataset}_ipc{ipc}/{engine}/synthetic.h5"
                out[f"{dataset}/{ipc}/{engine}"] = {
                    "options": ns["distill_options"](w),
                    "run": ns["distill_run_options"](w, _Output(synthetic)),
                }
    return out


def recorded_cases(record: Path) -> list[str]:
    """The cases of ``record`` (for parametrize; none while the file is missing)."""
    return sorted(json.loads(record.read_text())) if record.exists() else []


def assert_as_recorded(record: Path, case: str, generated: dict[str, str]) -> None:
    """``generated`` (the strings of ``case`` the workflow writes now) equals the record's,
    key by key; a difference names each key that differs with its (recorded, generated)."""
    recorded = json.loads(record.read_text())[case]
    differ = {k: (recorded.get(k), generated.get(k)) for k in {*recorded, *generated} if recorded.get(k) != generated.get(k)}
    assert not differ, f"{case}: (recorded, generated) differ: {differ}"


def write_record(record: Path, strings: dict[str, dict[str, str]]) -> None:
    """Record ``strings`` anew (only where a change of the strings is decided on)."""
    record.write_text(json.dumps(strings, indent=1, sort_keys=True) + "\n")
    print(f"recorded {record}")


def recorded_strings_tests(record: Path, all_strings: Callable[[], dict[str, dict[str, str]]]) -> tuple[Any, Any, Any]:
    """The tests of a module that checks generated strings against ``record``: its module-scoped
    ``generated`` fixture (``all_strings()``), a test that the record covers every generated case,
    and one test per recorded case. A module binds the three to its own names (pytest collects
    them there)::

        generated, test_the_record_covers_every_case, test_the_workflow_writes_the_recorded_strings = (
            recorded_strings_tests(RECORD, all_strings))
    """

    @pytest.fixture(scope="module")
    def generated() -> dict[str, dict[str, str]]:
        return all_strings()

    def test_the_record_covers_every_case(generated: dict[str, dict[str, str]]) -> None:
        assert recorded_cases(record) == sorted(generated)

    @pytest.mark.parametrize("case", recorded_cases(record))
    def test_the_workflow_writes_the_recorded_strings(generated: dict[str, dict[str, str]], case: str) -> None:
        assert_as_recorded(record, case, generated[case])

    return generated, test_the_record_covers_every_case, test_the_workflow_writes_the_recorded_strings


class _Workflow(SimpleNamespace):
    """The attributes of Snakemake's ``workflow`` that common.smk reads; false, so that
    snakemake.utils.validate reads the schema by its absolute path, as outside a workflow."""

    def __bool__(self) -> bool:
        return False


class _Output(list):
    """A job's ``output``: a list of paths with the named ``synthetic``."""

    def __init__(self, synthetic: str):
        super().__init__([synthetic])
        self.synthetic = synthetic


def hand_made_config(base: dict, hand: dict) -> dict:
    """``base`` with its demo dataset's distill rows replaced by ``hand``'s rows (each over
    the demo's first row), its experts updated by ``hand['experts']`` and its seed ``hand['seed']``."""
    cfg = copy.deepcopy(base)
    cfg["seed"] = hand["seed"]
    demo = cfg["datasets"]["demo"]
    demo["experts"].update(hand["experts"])
    template = demo["distill"][1]
    demo["distill"] = {ipc: {**template, **row} for ipc, row in hand["distill"].items()}
    return cfg

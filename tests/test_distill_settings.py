"""tesla.distill_settings: the settings of `tesla distill`, declared once, reach the command
line, the config schema, the workflow's command and the docs table (that the module needs no
torch is held by tests/test_architecture.py, for every settings module); the window's rules are
one function for the command line and the config alike; and a setting added to the declaration
shows up in every generated place.

Time budget: a few seconds."""

from __future__ import annotations

import argparse
import dataclasses
import json

import jsonschema
import pytest
import yaml

from tesla import distill_settings as ds
from tesla.distill_settings import DistillSettings, window_problems, workflow_options
from tesla.errors import TeslaError
from tesla.settings import SchemaBlock, add_arguments, declared, from_args, markdown_table, schema_yaml, setting
from tesla.settings_blocks import BLOCKS, SCHEMA
from workflow_options import ROOT, hand_made_config, workflow_functions

FIXTURE = json.loads((ROOT / "tests" / "distill_params.json").read_text())


def _parser(cls: type = DistillSettings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(parser, cls)
    return parser


def _parsed(cls: type, options: str) -> DistillSettings:
    """The settings a workflow command line gives (with the paths the rule adds)."""
    argv = ["--train", "t.h5", "--experts", "e.h5", "--out", "o.h5", *options.split()]
    return from_args(cls, _parser(cls).parse_args(argv))


def test_result_neutral_and_resume_tunable_come_from_the_declarations():
    by_name = {d.name: d.setting for d in declared(DistillSettings)}
    assert ds.RESULT_NEUTRAL == {n for n, s in by_name.items() if not s.result}
    assert ds.RESUME_TUNABLE == {n for n, s in by_name.items() if s.resume_tunable}
    # what a run computes depends on its step sizes and labels, not on where it writes or its guard's limits
    assert {"lr_img", "soft_labels", "min_start_epoch"}.isdisjoint(ds.RESULT_NEUTRAL)
    assert {"out", "checkpoint_every", "max_loss", "device"} <= ds.RESULT_NEUTRAL
    assert "expert_epochs" not in ds.RESUME_TUNABLE and "lr_img" in ds.RESUME_TUNABLE


@pytest.mark.parametrize("config", ["config/config.yaml", "hand_made"])
def test_every_setting_of_a_row_reaches_the_workflows_command(config):
    """Parse each job's params back with the generated parser: every distill key of the row
    (filled with the schema's defaults) is the parsed setting's value."""
    base = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg = base if config == "config/config.yaml" else hand_made_config(base, FIXTURE["hand_made"])
    ns = workflow_functions(cfg)
    keys = {d.config_key: d for d in declared(DistillSettings) if d.config_key and d.setting.result}
    checked = 0
    for name, dataset in ns["config"]["datasets"].items():
        for ipc, row in dataset["distill"].items():
            engine = row["engine"][0]
            options = ns["distill_options"](argparse.Namespace(dataset=name, ipc=ipc, engine=engine))
            parsed = _parsed(DistillSettings, options)
            assert (parsed.ipc, parsed.engine, parsed.seed) == (int(ipc), engine, ns["config"]["seed"])
            for key, d in keys.items():
                if key == "engine" or (d.setting.skip is not None and d.setting.skip(row)):
                    continue  # one engine per job; a setting the row does not use (labels, init snapshot)
                value = d.setting.from_config(row[key]) if d.setting.from_config else row[key]
                assert getattr(parsed, d.name) == value, f"{name}.distill.{ipc}.{key}"
                checked += 1
    assert checked > 100


@pytest.mark.parametrize("values, message", [
    (dict(min_start_epoch=4, max_start_epoch=4), "min_start_epoch 4 must be >= 0 and below max_start_epoch 4"),
    (dict(max_start_epoch=4, max_start_epoch_final=9), "a moving window needs both max_start_epoch_final and window_iterations"),
    (dict(max_start_epoch=4, window_iterations=9), "a moving window needs both"),
    (dict(max_start_epoch=4, max_start_epoch_final=3, window_iterations=9), "max_start_epoch_final 3 is below max_start_epoch 4"),
])
def test_the_window_rules_are_one_function_for_the_config_and_the_command_line(values, message):
    [problem] = window_problems(values, str)
    assert message in problem
    settings = dataclasses.replace(DistillSettings(train="t", experts=["e"], out="o", ipc=1), **values)
    with pytest.raises(TeslaError, match="--") as refused:
        ds.check_window(settings)
    assert str(refused.value) == window_problems(values, settings.wording.name)[0]
    assert window_problems(dict(max_start_epoch=4, min_start_epoch=3, max_start_epoch_final=6, window_iterations=2), str) == []


def test_the_last_snapshot_rule_is_the_settings_on_a_row_and_on_a_run():
    from tesla.registries import last_snapshot_needed

    row = dict(max_start_epoch=4, expert_epochs=2, max_start_epoch_final=9, window_iterations=10)
    settings = DistillSettings(train="t", experts=["e"], out="o", ipc=1, **row)
    assert settings.last_window_snapshot == ds.last_window_snapshot(row) == last_snapshot_needed(row) == 11
    assert last_snapshot_needed({**row, "init_epoch": 12}) == 12


# ---------------------------------------------------------------------------------------
# adding a setting: one declaration
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class Grown(DistillSettings):
    """DistillSettings with one more setting, declared as every other one is."""

    momentum_img: float = setting(0.5, help="momentum of the images' SGD", kind=float, minimum=0.0, maximum=1.0)


def test_a_new_distill_setting_reaches_the_command_line_the_schema_the_table_and_the_workflow(tmp_path):
    # the command line
    assert _parsed(Grown, "--ipc 1 --momentum-img 0.9").momentum_img == 0.9
    with pytest.raises((SystemExit, argparse.ArgumentError)):
        _parser(Grown).parse_args(["--train", "t", "--experts", "e", "--out", "o", "--ipc", "1", "--momentum-img", "2"])
    # the schema block, as `python -m tesla.settings_blocks --write` writes it, in a copy of the schema
    schema_file = tmp_path / "config.schema.yaml"
    schema_file.write_text((ROOT / SCHEMA).read_text())
    [block] = [b for path, b in BLOCKS if path == SCHEMA and b.name == "tesla.distill_settings"]
    assert SchemaBlock(block.name, block.regenerate, schema_yaml(Grown)).write(schema_file)
    schema = yaml.safe_load(schema_file.read_text())
    row_schema = {**schema["$defs"]["distill_settings"], "$defs": schema["$defs"]}
    jsonschema.validate({"momentum_img": 0.7}, row_schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"momentum_img": 1.5}, row_schema)
    # the docs table and the workflow's command (a result setting: the job's params, after today's options)
    assert "| `momentum_img` | `0.5` | yes | momentum of the images' SGD |" in markdown_table(Grown)
    row = {"syn_steps": 10, "momentum_img": 0.7}
    options = workflow_options(row, result=True, cls=Grown, ipc=1, engine="exact", seed=0)
    assert options.endswith("--seed 0 --momentum-img 0.7")
    assert _parsed(Grown, options).momentum_img == 0.7
    assert "--momentum-img" not in workflow_options({**row, "momentum_img": 0.5}, result=True, cls=Grown, ipc=1,
                                                    engine="exact", seed=0)  # at its default: left out

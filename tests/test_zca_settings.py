"""``tesla zca``'s settings are declared once (tesla.zca_settings): the command's parser, its
bounds (refused as the arguments are parsed, before any file is read or written), the
config schema's ``zca_eps`` and its row of config/README.md, and the zca job's params
(tests/test_zca_options.py) come from the declaration. (That the module needs no torch is held
by tests/test_architecture.py, for every settings module.)

Time budget: about two seconds (parsers, text)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import yaml

from tesla.cli import build_parser, main
from tesla.settings import declared, from_args, markdown_table, result_neutral, schema_properties
from tesla.zca import DEFAULT_EPS
from tesla.zca_settings import ZcaSettings

from conftest import blob_classes, write_prepared_split

ROOT = Path(__file__).resolve().parents[1]


def _sub_parser() -> argparse.ArgumentParser:
    parser = build_parser(only="zca")
    return next(a for a in parser._actions if a.dest == "command").choices["zca"]


def test_tesla_zca_parses_into_the_declared_defaults():
    args = build_parser(only="zca").parse_args(["zca", "--train", "t.h5", "--out", "z.h5"])
    got = from_args(ZcaSettings, args)
    assert got == ZcaSettings(train=Path("t.h5"), out=Path("z.h5"))
    assert (got.normalize, got.eps, got.chunk, got.device) == ("split", DEFAULT_EPS, 4096, "cpu")


def test_every_option_of_tesla_zca_is_a_declared_setting():
    dests = {a.dest for a in _sub_parser()._actions} - {"help"}
    assert dests == {d.name for d in declared(ZcaSettings)}


def test_only_the_device_leaves_the_result_alone():
    """--chunk is not result-neutral: the covariance is summed chunk by chunk (in float64, shifted
    by the first chunk's mean), so another chunk size changes the last bits."""
    assert result_neutral(ZcaSettings) == {"device"}


@pytest.mark.parametrize("argv, message", [
    (["--eps", "0"], "argument --eps: 0.0 is outside the allowed range above 0"),
    (["--eps", "-1"], "argument --eps: -1.0 is outside the allowed range above 0"),
    (["--eps", "nan"], "argument --eps"),
    (["--eps", "inf"], "argument --eps"),
    (["--chunk", "0"], "argument --chunk: 0 is outside the allowed range >= 1"),
    (["--normalize", "cifar"], "argument --normalize: invalid choice"),
])
def test_the_command_line_refuses_out_of_range_values_as_it_parses(tmp_path, capsys, argv, message):
    out = tmp_path / "z.h5"
    with pytest.raises(SystemExit) as refused:
        main(["zca", "--train", str(tmp_path / "never-read.h5"), "--out", str(out), *argv])
    assert refused.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_an_out_that_is_the_training_split_is_refused_and_left_alone(tmp_path, capsys):
    rng = np.random.default_rng(0)
    train = write_prepared_split(tmp_path / "train.h5", blob_classes(rng, 2, 3, 4, 1), dataset="tiny")
    before = train.read_bytes()
    assert main(["zca", "--train", str(train), "--out", str(train)]) == 2
    assert "--out" in (err := capsys.readouterr().err) and "is the training split itself; choose another" in err
    assert train.read_bytes() == before


def test_the_schema_key_is_the_declaration_and_as_it_was():
    """The generated zca_eps of a dataset entry means what the hand-written key meant."""
    assert schema_properties(ZcaSettings) == {"zca_eps": {
        "description": "regulariser eps of the ZCA whitening (the published value is 0.1)",
        "$ref": "#/$defs/positive_number",
        "default": 0.1,
    }}
    schema = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    assert schema["$defs"]["dataset"]["properties"]["zca_eps"] == schema_properties(ZcaSettings)["zca_eps"]
    assert schema["$defs"]["positive_number"] == {"type": "number", "exclusiveMinimum": 0}


def test_the_readme_table_is_the_declarations():
    table = markdown_table(ZcaSettings)
    assert "| `zca_eps` | `0.1` | yes |" in table
    assert table in (ROOT / "config" / "README.md").read_text()

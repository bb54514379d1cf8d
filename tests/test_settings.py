"""tesla.settings: one declaration gives the command line, the schema, the workflow's
command and the docs table; a setting added through it shows up in all of them."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from tesla.settings import (
    SchemaBlock,
    add_arguments,
    command_options,
    declared,
    from_args,
    markdown_table,
    result_neutral,
    schema_properties,
    setting,
)


@dataclasses.dataclass
class Toy:
    train: str = setting(help="the split", required=True, config=None)
    steps: int = setting(20, help="student steps", kind=int, minimum=1)
    lr: float = setting(0.01, help="learning rate", kind=float, always=True)
    labels: str = setting("none", help="labels", choices=("none", "tesla"), nargs="?", const="tesla")
    progress: bool = setting(True, help="progress bar", kind=bool, config=None, result=False)
    tf32: bool | None = setting(None, help="TF32", kind=bool)
    every: int = setting(100, help="checkpoint interval", kind=int, result=False, group="checkpoints")


def _parser(cls: type = Toy) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(parser, cls)
    return parser


def test_the_command_line_comes_from_the_declaration():
    args = _parser().parse_args(["--train", "t.h5", "--steps", "3", "--labels", "--no-progress", "--no-tf32"])
    assert from_args(Toy, args) == Toy(train="t.h5", steps=3, labels="tesla", progress=False, tf32=False)
    assert from_args(Toy, _parser().parse_args(["--train", "t.h5"])) == Toy(train="t.h5")


@pytest.mark.parametrize("argv", [["--steps", "3"], ["--train", "t", "--steps", "0"], ["--train", "t", "--lr", "nan"]])
def test_the_command_line_refuses_what_the_declaration_refuses(argv, capsys):
    with pytest.raises((SystemExit, argparse.ArgumentError)):
        _parser().parse_args(argv)


def test_the_workflow_command_leaves_defaults_out_unless_declared_always():
    assert command_options(Toy, {}, result=True) == ["--lr 0.01"]
    entry = {"steps": 3, "labels": "tesla", "tf32": True, "every": 5}
    assert command_options(Toy, entry, result=True) == ["--steps 3", "--lr 0.01", "--labels", "--tf32"]
    assert command_options(Toy, entry, result=False) == ["--every 5"]
    assert command_options(Toy, entry, result=True, order=("lr",))[0] == "--lr 0.01"


def test_schema_and_table_come_from_the_declaration():
    props = schema_properties(Toy)
    assert set(props) == {"steps", "lr", "labels", "tf32", "every"}  # train and progress are not config keys
    assert props["steps"] == {"description": "student steps", "type": "integer", "minimum": 1, "default": 20}
    assert props["tf32"]["anyOf"] == [{"type": "boolean"}, {"type": "null"}]
    assert props["labels"]["enum"] == ["none", "tesla"]
    table = markdown_table(Toy, prefix="x.")
    assert "| `x.every` | `100` | no | checkpoint interval |" in table
    assert result_neutral(Toy) == {"progress", "every"}


def test_a_new_setting_reaches_every_generated_place():
    @dataclasses.dataclass
    class Grown(Toy):
        momentum: float = setting(0.5, help="image momentum", kind=float, minimum=0.0, maximum=1.0)

    assert [d.name for d in declared(Grown)][-1] == "momentum"
    assert from_args(Grown, _parser(Grown).parse_args(["--train", "t", "--momentum", "0.9"])).momentum == 0.9
    assert schema_properties(Grown)["momentum"]["maximum"] == 1.0
    assert "--momentum 0.7" in command_options(Grown, {"momentum": 0.7}, result=True)
    assert "`momentum`" in markdown_table(Grown)


def test_a_generated_block_is_rewritten_between_its_markers(tmp_path):
    block = SchemaBlock("toy", "python -m toy", lambda indent: " " * indent + "a: 1\n")
    path = tmp_path / "schema.yaml"
    path.write_text(f"top:\n  {block.begin}\n  stale: 0\n  {block.end}\nend: 1\n")
    assert not block.check(path)
    assert block.write(path)
    assert path.read_text() == f"top:\n  {block.begin}\n  a: 1\n  {block.end}\nend: 1\n"
    assert block.check(path) and not block.write(path)
    (tmp_path / "bare.yaml").write_text("top: 1\n")
    with pytest.raises(ValueError, match="marker lines"):
        block.check(tmp_path / "bare.yaml")

"""tesla.settings: one declaration gives the command line, the schema, the workflow's
command and the docs table; a setting added through it shows up in all of them."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from tesla.errors import TeslaError
from tesla.settings import (
    SchemaBlock,
    Wording,
    add_arguments,
    bound_problems,
    command_options,
    declared,
    from_args,
    markdown_table,
    result_neutral,
    resume_tunable,
    schema_properties,
    schema_yaml,
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
    assert "| `x.tf32` | null | yes | TF32 |" in table
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
    with pytest.raises(TeslaError, match="bare.yaml: the marker lines of the block generated from toy are missing"):
        block.check(tmp_path / "bare.yaml")


# ---------------------------------------------------------------------------------------
# what the distill settings needed: exclusive bounds, a config default spelt as before, an
# older config's spelling, values the workflow sets, resume, bound checks, lazy choices
# ---------------------------------------------------------------------------------------
def _names() -> tuple[str, ...]:
    return ("exact", "tesla")


@dataclasses.dataclass
class Run:
    out: str = setting(help="output", required=True, config=None, result=False, resume_tunable=True)
    ipc: int = setting(help="images per class", kind=int, required=True, minimum=1, config=None)
    lr: float = setting(1000.0, help="step", kind=float, above=0, always=True, config_default=1000, resume_tunable=True)
    kind: str = setting("none", help="labels", choices=("none", "tesla"), from_config=lambda v: "tesla" if v is True else v)
    engine: str = setting("exact", help="engine", choices=_names, always=True)
    growth: float = setting(100.0, help="limit", kind=float, above=1, maximum=1000, result=False)


def test_exclusive_bounds_reach_the_parser_the_schema_and_the_checks():
    parser = _parser(Run)
    with pytest.raises((SystemExit, argparse.ArgumentError)):
        parser.parse_args(["--out", "o", "--ipc", "1", "--lr", "0"])
    assert from_args(Run, parser.parse_args(["--out", "o", "--ipc", "1", "--engine", "tesla"])).engine == "tesla"
    with pytest.raises((SystemExit, argparse.ArgumentError)):
        parser.parse_args(["--out", "o", "--ipc", "1", "--engine", "unroll"])  # the callable's choices
    props = schema_properties(Run)
    assert props["lr"] == {"description": "step", "type": "number", "exclusiveMinimum": 0, "default": 1000}
    assert props["growth"]["exclusiveMinimum"] == 1 and props["growth"]["maximum"] == 1000
    assert props["engine"]["enum"] == ["exact", "tesla"]
    bad = Run(out="o", ipc=0, lr=float("nan"), growth=1.0)
    assert bound_problems(bad, lambda name: "--" + name) == [
        "--ipc must be an integer >= 1, got 0",
        "--lr must be a finite number above 0, got nan",
        "--growth must be a finite number above 1 and <= 1000, got 1.0",
    ]
    assert bound_problems(Run(out="o", ipc=1), str) == []


def test_the_workflow_writes_a_config_default_as_spelt_reads_old_spellings_and_takes_given_values():
    assert command_options(Run, {}, result=True, given={"ipc": 3, "engine": "tesla"}) == ["--ipc 3", "--lr 1000", "--engine tesla"]
    assert command_options(Run, {"lr": 10.0, "kind": True}, result=True, given={"ipc": 1}) == [
        "--ipc 1", "--lr 10.0", "--kind tesla", "--engine exact"]
    assert command_options(Run, {"growth": 50}, result=False, given={"out": "x.h5"}) == ["--out x.h5", "--growth 50"]
    assert "| `lr` | `1000` | yes | step |" in markdown_table(Run)
    assert resume_tunable(Run) == {"out", "lr"}


def test_wording_names_a_setting_by_its_flag_or_its_config_key():
    assert Wording().name("lr_lr") == "--lr-lr" and not Wording().in_workflow
    assert Wording("datasets.demo.distill.1").name("lr_lr") == "datasets.demo.distill.1.lr_lr"
    assert Wording().names(("lr", "ipc"), {"lr": 1e6, "ipc": 3}) == "--lr (now 1e+06) or --ipc (now 3)"


def test_the_schema_yaml_of_a_declaration_reads_back_as_its_properties():
    import yaml

    text = schema_yaml(Run)(4)
    assert all(line.startswith("    ") for line in text.splitlines())
    assert yaml.safe_load(text) == schema_properties(Run)


def test_a_config_default_and_the_values_the_workflow_sets():
    @dataclasses.dataclass
    class Baseline(Toy):
        # the command line's None means "not given" (so the stage can refuse it where it does not apply)
        lr_random: float | None = setting(None, help="baseline lr", kind=float, config_default=0.01, always=True)
        ipc: int | None = setting(None, help="images per class", kind=int, config=None)

    props = schema_properties(Baseline)
    assert props["lr_random"]["default"] == 0.01 and props["lr_random"]["type"] == "number"  # not nullable
    assert "ipc" not in props
    assert from_args(Baseline, _parser(Baseline).parse_args(["--train", "t"])).lr_random is None
    assert "| `lr_random` | `0.01` | yes | baseline lr |" in markdown_table(Baseline)
    assert "| `labels` | `none` |" in markdown_table(Baseline)
    assert "--lr-random 0.01" in command_options(Baseline, {}, result=True)  # a missing key takes the config's default
    opts = command_options(Baseline, {"steps": 3}, result=True, order=("ipc",), given={"ipc": 2, "steps": 4})
    assert opts[:2] == ["--ipc 2", "--steps 4"]  # a setting that is no config key, and a given value winning
    assert command_options(Baseline, {}, result=True, given={"ipc": None}) == ["--lr 0.01", "--lr-random 0.01"]


def test_the_schema_keys_as_yaml_lines():
    import yaml

    text = schema_yaml(Toy)(4)
    assert all(line.startswith("    ") for line in text.splitlines())
    assert yaml.safe_load(text) == schema_properties(Toy)
    assert "    labels:\n" in text


def test_the_table_spells_defaults_as_the_config_does():
    @dataclasses.dataclass
    class Flags:
        on: bool = setting(True, help="on", kind=bool)
        names: tuple = setting(("a", "b"), help="names", schema={"type": "array"})

    table = markdown_table(Flags)
    assert "| `on` | `true` |" in table and "| `names` | `[a, b]` |" in table


# ---------------------------------------------------------------------------------------
# a mutually exclusive group of options (what `tesla evaluate` trains on)
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class Either:
    image: str | None = setting(None, help="an image", config=None, required=True, exclusive="what")
    folder: str | None = setting(None, help="a folder", config=None, required=True, exclusive="what", metavar="DIR")
    random: bool = setting(False, help="random images", kind=bool, config=None, required=True, exclusive="what")
    size: int = setting(8, help="size", kind=int, minimum=1)
    fast: bool = setting(False, help="fast", kind=bool, config=None, exclusive="how", group="speed")
    slow: bool = setting(False, help="slow", kind=bool, config=None, exclusive="how", group="speed")


def test_a_required_exclusive_group_takes_exactly_one_of_its_members():
    parser = _parser(Either)
    assert from_args(Either, parser.parse_args(["--folder", "d"])) == Either(folder="d")
    assert from_args(Either, parser.parse_args(["--random", "--size", "3", "--slow"])) == Either(random=True, size=3,
                                                                                                  slow=True)
    assert "(--image IMAGE | --folder DIR | --random)" in parser.format_usage()
    with pytest.raises(argparse.ArgumentError, match="not allowed with argument --image"):
        parser.parse_args(["--image", "a", "--folder", "d"])
    with pytest.raises(argparse.ArgumentError, match="not allowed with argument"):
        parser.parse_args(["--image", "a", "--random"])
    with pytest.raises(SystemExit):  # none of them: argparse names the group's options
        parser.parse_args(["--size", "3"])


def test_an_exclusive_group_not_required_takes_at_most_one_in_its_argument_group():
    parser = _parser(Either)
    assert from_args(Either, parser.parse_args(["--random"])) == Either(random=True)  # neither --fast nor --slow
    with pytest.raises(argparse.ArgumentError, match="not allowed with argument --fast"):
        parser.parse_args(["--random", "--fast", "--slow"])
    speed = next(g for g in parser._action_groups if g.title == "speed")
    assert {a.dest for a in speed._group_actions} == {"fast", "slow"}  # listed under their group in --help


def test_an_exclusive_group_is_required_by_all_its_members_or_none():
    @dataclasses.dataclass
    class Mixed:
        a: str | None = setting(None, help="a", config=None, required=True, exclusive="one")
        b: str | None = setting(None, help="b", config=None, exclusive="one")

    with pytest.raises(ValueError, match="b: the members of the exclusive group 'one' must all be required or none"):
        _parser(Mixed)


def test_a_block_of_keys_nests_in_the_schema_and_the_table():
    """A setting whose kind is a settings dataclass is a block of config keys: an object of its
    keys (default {}, no others allowed) in the schema, each key its own row in the table."""
    import yaml

    @dataclasses.dataclass(frozen=True)
    class Inner:
        dir: str = setting("out", help="where")
        mode: str = setting("a", help="how", choices=("a", "b"), result=False)

    @dataclasses.dataclass(frozen=True)
    class Outer:
        kind: str = setting("none", help="which", choices=("none", "x"))
        inner: Inner = setting(Inner(), kind=Inner, help="")  # no help: no description of its own

    props = schema_properties(Outer)
    assert props["inner"] == {"type": "object", "default": {}, "additionalProperties": False, "properties": {
        "dir": {"description": "where", "type": "string", "minLength": 1, "default": "out"},
        "mode": {"description": "how", "enum": ["a", "b"], "default": "a"}}}
    text = schema_yaml(Outer)(2)
    assert yaml.safe_load(text) == props and "      dir:\n" in text  # nested, as block YAML
    table = markdown_table(Outer, "top.")
    assert "| `top.inner.dir` | `out` | yes | where |" in table and "| `top.inner.mode` | `a` | no | how |" in table
    assert "`top.inner` " not in table


def test_a_marker_is_a_whole_line_so_one_blocks_end_does_not_end_another(tmp_path):
    """The end marker of block ``toy`` begins the end marker of block ``toy.more``: with ``toy``'s
    own end gone, ``toy`` is refused instead of swallowing ``toy.more`` up to its end."""
    toy = SchemaBlock("toy", "python -m toy", lambda indent: " " * indent + "a: 1\n")
    more = SchemaBlock("toy.more", "python -m toy", lambda indent: " " * indent + "b: 2\n")
    path = tmp_path / "schema.yaml"
    path.write_text(f"  {toy.begin}\n  a: 1\n  {toy.end}\n  {more.begin}\n  b: 2\n  {more.end}\n")
    assert toy.check(path) and more.check(path)
    path.write_text(path.read_text().replace(f"  {toy.end}\n", ""))
    with pytest.raises(TeslaError, match="schema.yaml: the marker lines of the block generated from toy are missing"):
        toy.generated(path)

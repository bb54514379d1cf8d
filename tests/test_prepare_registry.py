"""The registry of data sources: `tesla prepare`'s parser, the config schema's dataset keys and
the workflow's command line all come from the sources' declarations; a source registered at
test time is picked up by each of them; the command lines of existing config entries are
those earlier workflows wrote (no spurious re-prepare)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tesla.cli import build_parser, main
from tesla.data import ImageSplit
from tesla.data.sources import registry
from tesla.data.sources import workflow as data_sources
from tesla.data.sources.base import ArraySplit, DatasetPlan, SourceOptions
from tesla.data.sources.options import INPUT, Option
from tesla.data.sources.registry import DataSource
from tesla.errors import TeslaError

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"


def earlier_command(ds: dict, name: str) -> str:
    """The command line the workflow wrote before the registry (workflow/rules/common.smk's
    prepare_options at commit 6cb807c), the reference the generated one must equal."""
    opts = [ds["source"]]
    if ds["source"] != "demo":
        opts.append(f"--input {Path(ds['input'])}")
    for key, flag in (("test_input", "test-input"), ("test_labels", "test-labels"), ("synsets", "synsets")):
        if ds[key]:
            opts.append(f"--{flag} {Path(ds[key])}")
    opts.append(f"--name {name}")
    if ds["test_fraction"] is not None:
        opts.append(f"--test-fraction {ds['test_fraction']}")
    if ds["resolution"] is not None:
        opts.append(f"--resolution {ds['resolution']}")
    if ds["source"] in ("imagenet", "parquet", "folder"):
        opts.append(f"--resize {ds['resize']}")
        if ds["resize_filter"] != "box":
            opts.append(f"--resize-filter {ds['resize_filter']}")
        if ds["channels"] is not None:
            opts.append(f"--channels {ds['channels']}")
    if ds["source"] in ("imagenet", "parquet"):
        opts.append(f"--image-column {ds['image_column']}")
        opts.append(f"--label-column {ds['label_column']}")
    if ds["strict"]:
        opts.append("--strict")
    return " ".join(opts)


def with_defaults(entry: dict) -> dict:
    """A dataset entry with the schema's defaults filled in, as the workflow sees it."""
    defaults = {k: v["default"] for k, v in data_sources.config_properties().items() if "default" in v}
    return {**defaults, **entry}


def shipped_entries() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["datasets"]


#: settings of the earlier workflow's keys, each tried on every source that takes it
VARIANTS = [
    {},
    {"test_input": "/data/val", "test_labels": "/data/LOC_val_solution.csv", "synsets": "/data/synsets.txt"},
    {"test_fraction": 0.1, "resolution": 48},
    {"resize": "center-crop", "resize_filter": "lanczos", "channels": 1},
    {"image_column": "img", "label_column": "y", "strict": True},
    {"resolution": 16, "strict": True},
]


def test_command_lines_of_existing_entries_are_those_of_earlier_workflows():
    entries = {name: with_defaults(ds) for name, ds in shipped_entries().items()}
    for source in ("mnist", "fashion-mnist", "cifar10", "cifar100", "imagenet", "imagenet-downsampled", "parquet", "folder"):
        entries[f"any-{source}"] = with_defaults({"source": source, "input": f"/data/{source}"})
    checked = 0
    for name, entry in entries.items():
        if entry["source"] != "demo" and not entry["input"]:
            entry["input"] = f"/data/{name}"
        src = registry.get_source(entry["source"])
        for variant in VARIANTS:
            if any(not src.takes(next(o for o in registry.all_options() if o.key == k)) for k in variant):
                continue  # the earlier workflow passed such keys on, and tesla prepare refused them
            edited = {**entry, **variant}
            assert data_sources.prepare_command(edited, name) == earlier_command(edited, name), (name, variant)
            checked += 1
    assert checked >= 30


def test_new_keys_are_written_only_when_set():
    entry = with_defaults({"source": "folder", "input": "/data/tiny", "resolution": 64})
    base = data_sources.prepare_command(entry, "tiny")
    assert base == "folder --input /data/tiny --name tiny --resolution 64 --resize box"
    edited = {**entry, "ignore_non_images": True, "full_decode": True, "test_fraction": 0.2, "test_fraction_seed": 3}
    assert data_sources.prepare_command(edited, "tiny") == (
        "folder --input /data/tiny --name tiny --test-fraction 0.2 --resolution 64 --resize box "
        "--full-decode --ignore-non-images --seed 3"
    )
    mnist = with_defaults({"source": "mnist", "input": "/data/mnist", "download": True})
    assert data_sources.prepare_command(mnist, "mnist") == "mnist --input /data/mnist --name mnist --download"


def test_every_option_of_every_source_has_a_config_key_and_a_flag():
    keys = set(data_sources.config_properties())
    parser = build_parser("prepare")
    prepare = parser._subparsers._group_actions[0].choices["prepare"]  # noqa: SLF001 - argparse keeps subparsers here
    flags = {s for a in prepare._actions for s in a.option_strings}
    for source in registry.sources():
        for option in source.options:
            assert option.key in keys, (source.name, option.key)
            assert option.flag in flags, (source.name, option.flag)
    # the flags users had before the registry are all still there
    before = {"--input", "--test-input", "--test-labels", "--synsets", "--out-dir", "--name", "--resolution", "--resize",
              "--resize-filter", "--channels", "--full-decode", "--workers", "--strict", "--ignore-non-images",
              "--test-fraction", "--seed", "--download", "--image-column", "--label-column", "--quiet"}
    assert before <= flags


def test_schema_file_holds_the_generated_keys():
    assert data_sources.SCHEMA_BLOCK.check(SCHEMA), f"the dataset keys of {SCHEMA} are out of date: run {data_sources.REGENERATE}"
    schema = yaml.safe_load(SCHEMA.read_text())
    properties = schema["$defs"]["dataset"]["properties"]
    assert properties["source"]["enum"] == registry.source_names()
    assert properties["ignore_non_images"] == {**properties["ignore_non_images"], "type": "boolean", "default": False}


def test_the_schema_refuses_every_integer_the_command_line_refuses():
    """A config value that `tesla prepare` would refuse is refused by the config schema (when the
    workflow loads the config), not by the prepare job later: the range of an option's ``parse``
    is its schema's range."""
    import argparse

    import jsonschema

    from tesla.data.sources.options import CATALOG

    for option in CATALOG:
        if option.parse is None or option.schema is None:
            continue
        for value in (-1, 0, 1, 2**31 - 1, 2**31, 1_000_001, 2**40):
            try:
                option.parse(str(value))
            except argparse.ArgumentTypeError:
                with pytest.raises(jsonschema.ValidationError):
                    jsonschema.validate(value, dict(option.schema))


def test_layouts_come_from_the_sources():
    problems = data_sources.raw_data_problems(with_defaults({"source": "parquet"}), "datasets.shards")
    assert problems[0] == "config key datasets.shards.input is not set"
    assert problems[-1].startswith("accepted layouts for source 'parquet': input: a .parquet file")
    assert data_sources.raw_data_problems(with_defaults({"source": "demo"}), "datasets.demo") == []
    # a glob that matches files exists (the parquet and downsampled sources take globs)
    assert data_sources.raw_data_problems(with_defaults({"source": "parquet", "input": str(ROOT / "tests" / "test_*.py")}), "d") == []
    # --download fetches into the input folder: it need not exist yet
    assert data_sources.raw_data_problems(with_defaults({"source": "mnist", "input": "/no/such", "download": True}), "d") == []


def test_options_a_source_does_not_take_are_refused(tmp_path, capsys):
    assert main(["prepare", "mnist", "--input", str(tmp_path), "--channels", "1", "--out-dir", str(tmp_path / "o")]) == 2
    assert "--channels: not used by the mnist source (it is for imagenet, parquet, folder); drop it" in capsys.readouterr().err
    assert main(["prepare", "folder", "--input", str(tmp_path), "--image-column", "x", "--resolution", "8", "--out-dir", str(tmp_path / "o")]) == 2
    assert "--image-column: not used by the folder source" in capsys.readouterr().err
    problems = data_sources.unused_keys(with_defaults({"source": "cifar10", "test_fraction": 0.1, "channels": None}), "datasets.c")
    assert problems == ["config key datasets.c.test_fraction: not used by the cifar10 source (only imagenet, parquet, folder); remove it"]
    assert not (tmp_path / "o").exists()


# -- a source added at test time -------------------------------------------------------------

FLAVOUR = Option("toy_flavour", "how the toy images look", default="plain", choices=("plain", "striped"))


def plan_toy(opts: SourceOptions, name: str | None = None) -> DatasetPlan:
    """Two classes of 4 x 4 grey images; 'striped' images have every other row at 255."""
    flavour = opts.extra["toy_flavour"]
    images = np.zeros((6, 4, 4, 1), np.uint8)
    if flavour == "striped":
        images[:, ::2] = 255
    labels = np.array([0, 0, 0, 1, 1, 1])
    split = lambda s: ArraySplit(s, images, labels, str(opts.input))  # noqa: E731
    return DatasetPlan("toy", name or "toy", ["a", "b"], ["a", "b"], 1, 4, split("train"), split("test"), {"input": str(opts.input)})


@pytest.fixture
def toy():
    source = registry.register(
        DataSource("toy", "two classes of stripes", plan_toy, (INPUT, FLAVOUR), {"input": "any folder (not read)"})
    )
    yield source
    registry.unregister("toy")


def test_a_source_registered_once_is_picked_up_everywhere(toy, tmp_path, capsys):
    # the parser: the source, its option and its help
    parser = build_parser("prepare")
    with pytest.raises(SystemExit):
        parser.parse_args(["prepare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "toy (two classes of stripes)" in text and "--toy-flavour {plain,striped}" in text
    assert "how the toy images look (only toy)" in text
    # the conversion, with the source's own option reaching its planner
    out = tmp_path / "out"
    assert main(["prepare", "toy", "--input", str(tmp_path), "--toy-flavour", "striped", "--out-dir", str(out), "--quiet"]) == 0
    train = ImageSplit.open(out / "train.h5")
    assert train.class_ids == ["a", "b"] and int(train.images_uint8()[0, 0, 0, 0]) == 255
    # other sources refuse it
    assert main(["prepare", "demo", "--toy-flavour", "striped", "--out-dir", str(tmp_path / "d")]) == 2
    assert "--toy-flavour: not used by the demo source (it is for toy)" in capsys.readouterr().err
    # the config schema's keys
    properties = data_sources.config_properties()
    assert "toy" in properties["source"]["enum"]
    assert properties["toy_flavour"] == {
        "description": "how the toy images look; only toy", "enum": ["plain", "striped"], "default": "plain"
    }
    # the workflow's command line, raw-data check and config check
    entry = with_defaults({"source": "toy", "input": "/data/stripes", "toy_flavour": "striped"})
    assert data_sources.prepare_command(entry, "stripes") == "toy --input /data/stripes --name stripes --toy-flavour striped"
    assert data_sources.prepare_command({**entry, "toy_flavour": "plain"}, "stripes") == "toy --input /data/stripes --name stripes"
    assert data_sources.raw_data_problems(entry, "datasets.stripes")[-1] == "accepted layouts for source 'toy': input: any folder (not read)"
    assert data_sources.unused_keys(with_defaults({"source": "mnist", "toy_flavour": "striped"}), "datasets.m") == [
        "config key datasets.m.toy_flavour: not used by the mnist source (only toy); remove it"
    ]


def test_registration_is_checked():
    with pytest.raises(ValueError, match="registered twice"):
        registry.register(DataSource("folder", "again", plan_toy))
    with pytest.raises(ValueError, match="an option it does not take"):
        registry.register(DataSource("toy2", "x", plan_toy, (INPUT,), {"test_input": "not taken"}))
    other = Option("input", "another input", Path)
    with pytest.raises(ValueError, match="differs from the one already declared"):
        registry.register(DataSource("toy3", "x", plan_toy, (other,)))
    assert "toy2" not in registry.source_names() and "toy3" not in registry.source_names()
    with pytest.raises(TeslaError, match="unknown data source 'nope'"):
        registry.get_source("nope")


def test_prepare_help_is_fast_and_torch_free():
    code = "import sys; from tesla.cli import build_parser; build_parser('prepare'); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)

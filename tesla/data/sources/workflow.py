"""What the Snakemake workflow asks of the data-source registry.

A dataset entry of config/config.yaml carries ``source`` and one key per ``tesla prepare``
option with a config key (:attr:`Option.config`). From the registry
(:mod:`tesla.data.sources.registry`) this module gives

* the JSON-schema properties of those keys (:func:`config_properties`), written between two
  marker lines into workflow/schemas/config.schema.yaml as a generated block
  (:data:`SCHEMA_BLOCK`, rewritten with the project's other generated blocks by ``python -m
  tesla.settings_blocks --write``; a test checks that the committed file equals what the
  registry generates). The schema stays one static file, validated when the workflow starts
  and readable without the package;
* the options a dataset entry sets that its source does not take (:func:`unused_keys`,
  refused when the workflow starts);
* the ``tesla prepare`` command line of an entry (:func:`prepare_command`), the params of
  the workflow's prepare rule: Snakemake re-prepares a dataset whenever this string changes,
  so it keeps the order and the explicit defaults earlier workflows wrote;
* the check of the entry's raw-data paths, with the layouts the source accepts
  (:func:`raw_data_problems`): each path must exist, and the inputs the layout needs together
  must be set (the source's ``input_problems``: e.g. a class-folder tree without a test split
  needs ``test_input`` or ``test_fraction``, a flat test folder needs ``test_labels``).
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any, Callable, Mapping

from tesla.data.sources.options import Option
from tesla.data.sources.registry import all_options, get_source, source_names, source_options, takers
from tesla.settings import REGENERATE, SchemaBlock, properties_yaml

#: the order of the command line's options (as earlier workflows wrote them; an option
#: not listed here comes after these, in the order of ``tesla prepare --help``)
COMMAND_ORDER = (
    "input", "test_input", "test_labels", "synsets", "name", "test_fraction", "resolution",
    "resize", "resize_filter", "channels", "image_column", "label_column", "strict",
)  # fmt: skip
SOURCE_DESCRIPTION = "which reader of `tesla prepare` turns the raw data into HDF5 splits"


def config_keys() -> list[Option]:
    """The options that are dataset-level config keys."""
    return [o for o in all_options() if o.config]


def _value_schema(option: Option) -> dict[str, Any]:
    if option.schema is not None:
        return dict(option.schema)
    if option.is_path:
        return {"$ref": "#/$defs/path"}
    if option.choices is not None:
        return {"enum": [*option.choices, *([None] if option.default is None else [])]}
    kind = {bool: "boolean", int: "integer", float: "number", str: "string"}[option.kind]
    value: dict[str, Any] = {"type": kind, **({"minLength": 1} if option.kind is str else {})}
    return value if option.default is not None else {"anyOf": [value, {"type": "null"}]}


def config_properties() -> dict[str, dict[str, Any]]:
    """JSON-schema properties of a dataset entry's ``source`` and option keys."""
    properties: dict[str, dict[str, Any]] = {"source": {"description": SOURCE_DESCRIPTION, "enum": source_names()}}
    for option in config_keys():
        who = "" if option.common else takers(option)
        description = (option.config_help or option.help) + (f"; {who}" if who else "")
        properties[option.key] = {"description": description, **_value_schema(option), "default": option.default}
    return properties


#: the dataset keys of the config schema, generated from the registry
SCHEMA_BLOCK = SchemaBlock("tesla.data.sources (the options of tesla prepare)", REGENERATE, properties_yaml(config_properties))


def unused_keys(entry: Mapping[str, Any], where: str) -> list[str]:
    """'config key <where>.<key>: ...' for every option the entry sets (to anything but its
    default) that its source does not take."""
    source = get_source(entry["source"])
    return [
        f"config key {where}.{o.key}: not used by the {source.name} source ({takers(o)}); remove it"
        for o in config_keys()
        if o.key in entry and not source.takes(o) and not o.is_default(entry[o.key])
    ]


def resolution_of(entry: Mapping[str, Any]) -> int | None:
    """The side S of the images an entry's splits will hold: its ``resolution`` key, else
    the source's own size where it has a fixed one (demo 8, MNIST 28, CIFAR 32, ImageNet 64),
    else None (a size known only once the files are read)."""
    if entry.get("resolution") is not None:
        return int(entry["resolution"])
    note = get_source(entry["source"]).notes.get("resolution", "")
    digits = note.split(" ", 1)[0]
    return int(digits) if digits.isdigit() else None


def class_count(entry: Mapping[str, Any]) -> int | None:
    """The number of classes of an entry's dataset where its source fixes it (demo, MNIST,
    Fashion-MNIST, CIFAR-10, CIFAR-100), else None (the files tell: a class-folder tree,
    ImageNet in any form, parquet shards)."""
    return get_source(entry["source"]).num_classes


def _ordered(options: list[Option]) -> list[Option]:
    rank = {key: i for i, key in enumerate(COMMAND_ORDER)}
    return sorted(options, key=lambda o: rank.get(o.key, len(rank)))  # stable: the rest keep the help order


def prepare_command(entry: Mapping[str, Any], name: str, resolve: Callable[[str], Any] = Path) -> str:
    """``SOURCE --input ... --name NAME ...``: the options of ``tesla prepare`` a dataset entry
    sets, paths through ``resolve``; an option at its default is left out unless the source
    lists it in ``explicit_defaults`` (what earlier workflows wrote)."""
    source = get_source(entry["source"])
    values = {**entry, "name": name}
    parts = [source.name]
    for option in _ordered(all_options()):
        value = values.get(option.key)
        if not source.takes(option) or value is None:
            continue
        if option.is_default(value) and option.key not in source.explicit_defaults:
            continue
        if option.kind is bool:
            parts += [option.flag] if value else []
        else:
            parts.append(f"{option.flag} {resolve(value) if option.is_path else value}")
    return " ".join(parts)


def _exists(path: Path) -> bool:
    """A file or folder, or a glob that matches something (the streamed sources take globs)."""
    return path.exists() or (any(ch in str(path) for ch in "*?[") and bool(glob.glob(str(path))))


def raw_data_problems(entry: Mapping[str, Any], where: str, resolve: Callable[[str], Path] = Path) -> list[str]:
    """Problems with the raw-data paths of an entry (``where``: its config key), ending with the
    layouts its source accepts; empty when it can be prepared."""
    source = get_source(entry["source"])
    problems = []
    for option in (o for o in source.options if o.is_path):
        value = entry.get(option.key)
        if not value:
            if option.required:
                problems.append(f"config key {where}.{option.key} is not set")
        elif not _exists(resolve(value)) and not (option.key == "input" and entry.get("download")):  # fetched there
            problems.append(f"config key {where}.{option.key}: {value} does not exist")
    if not problems and source.input_problems is not None:
        values = {o.key: entry.get(o.key, o.default) for o in all_options()}
        values.update({o.key: resolve(entry[o.key]) for o in all_options() if o.is_path and entry.get(o.key)})
        problems = [f"config key {line}" for line in source.input_problems(source_options(values), lambda key: f"{where}.{key}")]
    if problems:
        problems.append(f"accepted layouts for source '{source.name}': {source.layouts() or 'see `tesla prepare --help`'}")
    return problems

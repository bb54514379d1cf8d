"""The data sources of ``tesla prepare``, each declared once (:class:`DataSource`).

A source module declares its sources in a module-level tuple ``SOURCES``: name, one-line
description, planner (the reader turning the user's files into a
:class:`~tesla.data.sources.base.DatasetPlan`), the source options it takes
(:mod:`tesla.data.sources.options`) and notes saying what it expects in them (its input
layouts). Registering a module is one line, its name in :data:`BUILTIN_MODULES`;
:func:`register` adds a source from elsewhere (a plugin, a test).

Everything that used to enumerate sources or their options reads this registry:
``tesla prepare``'s parser and its check of the options given (:func:`add_arguments`,
:func:`check_options`), :func:`plan_source`, and the workflow's config keys, command line and
raw-data check (:mod:`tesla.data.sources.workflow`). Whether a split is streamed is declared
by its type (:class:`~tesla.data.sources.base.StreamedSplit`), not by the source: the
``imagenet`` source returns either kind, depending on the files it is given.

Importing this module is light (no source module, no torch); the source modules are
imported on the first question about the sources.
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping

from tesla.data.sources.base import DatasetPlan, SourceOptions, refuse_empty_splits
from tesla.data.sources.options import CATALOG, Option
from tesla.errors import TeslaError

#: the modules (in tesla.data.sources) whose ``SOURCES`` are registered, in the order users see them
BUILTIN_MODULES = ("demo", "idx", "cifar", "imagenet", "downsampled", "parquet", "folder")

Planner = Callable[[SourceOptions, "str | None"], DatasetPlan]


@dataclass(frozen=True)
class DataSource:
    """A raw-data reader of ``tesla prepare``, as users see it."""

    name: str
    #: what it reads, in a few words (the ``source`` argument's help)
    description: str
    #: (options, dataset name or None) -> the plan of the conversion; the name defaults to the source's
    planner: Planner
    #: the source options it takes (the common options are taken by every source)
    options: tuple[Option, ...] = ()
    #: per option key, what this source expects there (the input layouts; its default resolution)
    notes: Mapping[str, str] = field(default_factory=dict)
    #: --resolution must be given (no native or default size)
    resolution_required: bool = False
    #: option keys the workflow writes on the command line even at their default value (as earlier
    #: workflows did: a changed command line would re-prepare existing datasets)
    explicit_defaults: tuple[str, ...] = ()
    #: the number of classes of every dataset it reads, when the source fixes it (the workflow
    #: checks batch_syn against it before any job); None when only the files tell
    num_classes: int | None = None
    #: (options, how to name an option by its key) -> the problems a cheap look at the given paths
    #: shows: the inputs a layout needs together (a test split, a labels file); the workflow asks
    #: before any job, each problem naming its setting
    input_problems: Callable[[SourceOptions, Callable[[str], str]], list[str]] | None = None

    def takes(self, option: Option) -> bool:
        return option.common or option in self.options

    def layouts(self) -> str:
        """The accepted paths, as the workflow shows them when one is missing: 'input: ...; test_input: ...'."""
        paths = [o.key for o in self.options if o.is_path]
        return "; ".join(f"{key}: {self.notes[key]}" for key in paths if key in self.notes)

    def plan(self, opts: SourceOptions, name: str | None = None) -> DatasetPlan:
        """The planner's plan, refused when a split (or a train class) would be empty."""
        plan = self.planner(opts, name)
        refuse_empty_splits(plan)
        return plan


_SOURCES: dict[str, DataSource] = {}
_loaded = False


def _load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    try:
        for module in BUILTIN_MODULES:
            for source in importlib.import_module(f"tesla.data.sources.{module}").SOURCES:
                _add(source)
    except BaseException:
        _SOURCES.clear()
        _loaded = False
        raise


def register(source: DataSource) -> DataSource:
    """Add a source (after the built-in ones); its name, options and notes are checked against
    those already known."""
    _load_builtins()
    return _add(source)


def _add(source: DataSource) -> DataSource:
    """Register after checking the name, the options (one declaration per key) and the notes."""
    if source.name in _SOURCES:
        raise ValueError(f"data source {source.name!r} is registered twice")
    known = {o.key: o for o in CATALOG} | {o.key: o for s in _SOURCES.values() for o in s.options}
    for option in source.options:
        if option.common:
            raise ValueError(f"{source.name}: option {option.key!r} is common to every source; do not list it")
        if option.key in known and known[option.key] != option:
            raise ValueError(f"{source.name}: option {option.key!r} differs from the one already declared")
        if option.key in {f.name for f in fields(SourceOptions)} - {"extra"} and option not in CATALOG:
            raise ValueError(f"{source.name}: option {option.key!r} shadows a SourceOptions field")
    taken = {o.key for o in CATALOG if o.common} | {o.key for o in source.options}
    for key in (*source.notes, *source.explicit_defaults):
        if key not in taken:
            raise ValueError(f"{source.name}: note or default for {key!r}, an option it does not take")
    _SOURCES[source.name] = source
    return source


def unregister(name: str) -> None:
    """Remove a source added with :func:`register` (tests)."""
    _SOURCES.pop(name, None)


def sources() -> list[DataSource]:
    """Every registered source, built-in ones first."""
    _load_builtins()
    return list(_SOURCES.values())


def source_names() -> list[str]:
    return [s.name for s in sources()]


def get_source(name: str) -> DataSource:
    _load_builtins()
    try:
        return _SOURCES[name]
    except KeyError:
        raise TeslaError(f"unknown data source {name!r}; choose one of {', '.join(_SOURCES)}") from None


def all_options() -> list[Option]:
    """The catalog's options, then those declared by source modules, in first-declared order."""
    seen = {o.key: o for o in CATALOG}
    for source in sources():
        for option in source.options:
            seen.setdefault(option.key, option)
    return list(seen.values())


def plan_source(name: str, opts: SourceOptions, dataset_name: str | None = None) -> DatasetPlan:
    """The :class:`DatasetPlan` of source ``name`` for these options (empty splits refused)."""
    return get_source(name).plan(opts, dataset_name)


# -- tesla prepare's command line ------------------------------------------------------------


def _grouped(notes: list[tuple[str, str]]) -> str:
    """'a/b: text; c: other' from (source, text) pairs, sources with the same text together."""
    texts: dict[str, list[str]] = {}
    for name, text in notes:
        texts.setdefault(text, []).append(name)
    return "; ".join(f"{'/'.join(names)}: {text}" for text, names in texts.items())


def taking(option: Option) -> list[str]:
    """The names of the sources that take an option."""
    return [s.name for s in sources() if s.takes(option)]


def takers(option: Option) -> str:
    """Which sources take an option, in the fewest words: 'only a, b', 'not used by c', or ''."""
    names = taking(option)
    others = [s.name for s in sources() if s.name not in names]
    if not others:
        return ""
    return f"not used by {', '.join(others)}" if len(others) < len(names) else f"only {', '.join(names)}"


def option_help(option: Option) -> str:
    """An option's help: its own text, what each source expects in it, and which sources take it."""
    text = option.help
    notes = [(s.name, s.notes[option.key]) for s in sources() if option.key in s.notes]
    if notes:
        text += ": " + _grouped(notes)
    who = takers(option)
    return f"{text} ({who})" if who else text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``tesla prepare``'s arguments: the source, then every option."""
    parser.add_argument(
        "source",
        choices=source_names(),
        help="raw dataset kind: " + ", ".join(f"{s.name} ({s.description})" for s in sources()),
    )
    for option in all_options():
        kwargs: dict[str, Any] = {"dest": option.key, "help": option_help(option)}
        if option.kind is bool:
            kwargs["action"] = "store_true"
        else:
            kwargs.update(type=option.value_type, default=option.default)
            if option.choices is not None:
                kwargs["choices"] = option.choices
            else:
                kwargs["metavar"] = option.flag[2:].upper().replace("-", "_")
            if option.common and option.required:
                kwargs["required"] = True
        parser.add_argument(option.flag, **kwargs)


def check_options(source: DataSource, values: Mapping[str, Any]) -> None:
    """Refuse, before any work, an option the source does not take (set to anything but its
    default), and a missing --resolution where the source has no size of its own."""
    for option in all_options():
        if not source.takes(option) and not option.is_default(values.get(option.key, option.default)):
            raise TeslaError(f"{option.flag}: not used by the {source.name} source (it is for {', '.join(taking(option))}); drop it")
    if source.resolution_required and values.get("resolution") is None:
        raise TeslaError(
            f"--resolution: required for the {source.name} source (e.g. 32 for CIFAR-sized images, 64 for ImageNet-style)"
        )


def source_options(values: Mapping[str, Any]) -> SourceOptions:
    """The planner's settings from parsed values: the SourceOptions fields, others in ``extra``."""
    own = {f.name for f in fields(SourceOptions)} - {"extra"}
    keys = [o.key for o in all_options() if not o.common and o.key in values]
    return SourceOptions(
        **{k: values[k] for k in keys if k in own},
        extra={k: values[k] for k in keys if k not in own},
    )

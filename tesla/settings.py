"""Settings declared once, and everything that is generated from the declaration.

A stage's settings are the fields of one dataclass (``DistillSettings``, ``ExpertSettings``,
...). Each field carries a :class:`Setting` in its metadata, declared with :func:`setting`:
its help, kind, bounds, choices, command-line flag, config key, whether it changes the
stage's result and whether the workflow writes it at its default. The field's default is
the setting's default. From these declarations come

* the command line's options (:func:`add_arguments`, :func:`from_args`);
* the JSON-schema properties of the config keys (:func:`schema_properties`), written between
  marker lines into workflow/schemas/config.schema.yaml (:class:`SchemaBlock`; a test checks
  that the committed file equals what the declarations generate);
* the workflow's command line from a config entry (:func:`command_options`), split into the
  settings that change a result (the rule's params: a change reruns the job) and those that
  do not (run options);
* the settings table of config/README.md (:func:`markdown_table`).

So adding a setting is one declaration plus the code that uses it. The choice of plain
dataclass metadata over a settings library is explained in docs/architecture.md.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from tesla.arguments import finite_float

__all__ = [
    "Setting",
    "Declared",
    "setting",
    "declared",
    "add_arguments",
    "from_args",
    "defaults",
    "schema_properties",
    "schema_yaml",
    "command_options",
    "result_neutral",
    "markdown_table",
    "SchemaBlock",
]

#: the config key of a setting that the workflow sets itself (no config key)
NOT_IN_CONFIG = None
_UNSET = object()


@dataclass(frozen=True)
class Setting:
    """The declaration of one setting (its default is the dataclass field's)."""

    help: str
    #: str, int, float, bool or Path; a bool with default False is a flag, with default True a
    #: --no- flag, with default None a --x/--no-x pair
    kind: type = str
    choices: tuple | None = None
    #: inclusive bounds of a number (checked by the command line and the schema)
    minimum: float | None = None
    maximum: float | None = None
    #: the command line cannot run without it (no default)
    required: bool = False
    #: argparse nargs ('+' for a list; '?' with ``const`` for an option whose bare flag means ``const``)
    nargs: str | None = None
    const: Any = None
    #: the command-line flag when it is not --<name with '-'>
    flag: str = ""
    metavar: str | None = None
    #: its argparse group's title ('' = the parser itself)
    group: str = ""
    #: its key in a config entry: '' = the field's name; None = not a config key (the workflow sets it)
    config: str | None = ""
    #: the config schema's description when it differs from ``help``
    config_help: str = ""
    #: the config key's default when it differs from the command line's (whose default, e.g.
    #: None for "not given", lets the stage tell a value given from one left out)
    config_default: Any = _UNSET
    #: the value's JSON schema when kind, bounds and choices say too little
    schema: Mapping[str, Any] | None = None
    #: changes what the stage computes (False: where, how often, how loudly, within which limits)
    result: bool = True
    #: written on the workflow's command line even at its default (what earlier workflows wrote,
    #: so that their jobs are not rerun); a callable decides from the config entry
    always: bool | Callable[[Mapping[str, Any]], bool] = False
    #: left off the workflow's command line in every case: a callable returning True skips it
    skip: Callable[[Mapping[str, Any]], bool] | None = None

    def value_type(self) -> Callable[[str], Any]:
        """The command line's type of a value: a float is finite, a bounded number is checked."""
        base: Callable[[str], Any] = finite_float if self.kind is float else self.kind
        if self.minimum is None and self.maximum is None:
            return base
        low, high = self.minimum, self.maximum

        def bounded(text: str) -> Any:
            value = base(text)
            if (low is not None and value < low) or (high is not None and value > high):
                raise argparse.ArgumentTypeError(f"{value} is outside the allowed range {_range(low, high)}")
            return value

        bounded.__name__ = f"{self.kind.__name__} {_range(low, high)}"
        return bounded


def _range(low: float | None, high: float | None) -> str:
    if high is None:
        return f">= {low:g}"
    if low is None:
        return f"<= {high:g}"
    return f"{low:g}-{high:g}"


def setting(default: Any = MISSING, **declaration: Any) -> Any:
    """A dataclass field declaring one setting: ``x: int = setting(20, help=..., minimum=1)``."""
    return dataclasses.field(default=default, metadata={"setting": Setting(**declaration)})


@dataclass(frozen=True)
class Declared:
    """One declared field: its name, default and declaration."""

    name: str
    default: Any
    setting: Setting

    @property
    def flag(self) -> str:
        return self.setting.flag or "--" + self.name.replace("_", "-")

    @property
    def config_key(self) -> str | None:
        key = self.setting.config
        return None if key is None else (key or self.name)

    @property
    def has_default(self) -> bool:
        return self.default is not MISSING

    @property
    def config_value(self) -> Any:
        """The config key's default (MISSING: none)."""
        given = self.setting.config_default
        return self.default if given is _UNSET else given


def declared(cls: type) -> list[Declared]:
    """The declared settings of a settings dataclass, in declaration order."""
    out = []
    for f in dataclasses.fields(cls):
        decl = f.metadata.get("setting")
        if decl is not None:
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            out.append(Declared(f.name, default, decl))
    return out


def defaults(cls: type) -> dict[str, Any]:
    """Every setting's default (the required ones left out)."""
    return {d.name: d.default for d in declared(cls) if d.has_default}


# ---------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------
def _argument(d: Declared) -> tuple[list[str], dict[str, Any]]:
    """argparse's add_argument arguments of one declared setting."""
    s = d.setting
    kw: dict[str, Any] = {"dest": d.name, "help": s.help}
    if s.kind is bool:
        if d.default is None:
            return [d.flag], {**kw, "action": argparse.BooleanOptionalAction, "default": None}
        if d.default is True:
            return ["--no-" + d.flag[2:]], {**kw, "action": "store_false"}
        return [d.flag], {**kw, "action": "store_true"}
    kw["type"] = s.value_type()
    if s.required or not d.has_default:
        kw["required"] = True
    else:
        kw["default"] = d.default
    for key in ("choices", "nargs", "metavar"):
        if getattr(s, key) is not None:
            kw[key] = getattr(s, key)
    if s.nargs == "?":
        kw["const"] = s.const
    return [d.flag], kw


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: frozenset[str] = frozenset()) -> None:
    """The options of every declared setting of ``cls`` (but ``skip``), grouped as declared."""
    groups: dict[str, Any] = {"": parser}
    for d in declared(cls):
        if d.name in skip:
            continue
        title = d.setting.group
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        flags, kw = _argument(d)
        groups[title].add_argument(*flags, **kw)


def from_args(cls: type, args: argparse.Namespace, **extra: Any) -> Any:
    """The settings object of parsed arguments (``extra`` fills or overrides fields)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    return cls(**{**values, **extra})


# ---------------------------------------------------------------------------------------
# the workflow: config keys, schema, command lines
# ---------------------------------------------------------------------------------------
def config_settings(cls: type) -> Iterator[Declared]:
    """The settings of ``cls`` that are config keys."""
    return (d for d in declared(cls) if d.config_key is not None)


def _value_schema(d: Declared) -> dict[str, Any]:
    s = d.setting
    if s.schema is not None:
        return dict(s.schema)
    if s.kind is Path:
        value: dict[str, Any] = {"$ref": "#/$defs/path"}
    elif s.choices is not None:
        return {"enum": [*s.choices, *([None] if d.config_value is None else [])]}
    else:
        kind = {bool: "boolean", int: "integer", float: "number", str: "string"}[s.kind]
        value = {"type": kind, **({"minLength": 1} if s.kind is str else {})}
        value.update({k: v for k, v in (("minimum", s.minimum), ("maximum", s.maximum)) if v is not None})
    return value if d.config_value is not None else {"anyOf": [value, {"type": "null"}]}


def schema_properties(cls: type) -> dict[str, dict[str, Any]]:
    """The JSON-schema properties of the config keys of ``cls``'s settings."""
    properties = {}
    for d in config_settings(cls):
        entry: dict[str, Any] = {"description": d.setting.config_help or d.setting.help, **_value_schema(d)}
        if d.config_value is not MISSING:
            entry["default"] = d.config_value
        properties[d.config_key] = entry
    return properties


def _plain(value: Any) -> Any:
    """A schema value as JSON has it (tuples as lists)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def schema_yaml(cls: type, indent: int = 0) -> str:
    """:func:`schema_properties` as the lines of a YAML schema file, indented by ``indent``:
    mappings in block style, lists in flow style."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))
    body = yaml.dump(_plain(schema_properties(cls)), Dumper=Dumper, sort_keys=False, default_flow_style=False,
                     width=110, allow_unicode=True)
    return "".join(f"{' ' * indent}{line}\n" for line in body.splitlines())


def format_value(value: Any) -> str:
    """A value on the workflow's command line (lists space-separated)."""
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


def command_options(
    cls: type,
    entry: Mapping[str, Any],
    result: bool,
    order: tuple[str, ...] = (),
    given: Mapping[str, Any] | None = None,
) -> list[str]:
    """The options of a config entry (keys: config keys) for the settings of ``cls`` that change
    the result (``result=True``: the rule's params) or do not (run options). A value equal to
    the default is left out unless the setting is declared ``always``; a missing key takes
    the config's default; names in ``order`` come first, in that order, then the rest as
    declared. ``given`` (by field name) holds the values the workflow sets itself, for settings
    that are not config keys or whose option it derives from the entry (they win over it)."""
    given = dict(given or {})
    rank = {name: i for i, name in enumerate(order)}
    options = (d for d in declared(cls) if d.config_key is not None or d.name in given)
    chosen = sorted((d for d in options if d.setting.result == result), key=lambda d: rank.get(d.name, len(rank)))
    opts = []
    for d in chosen:
        s = d.setting
        default = None if d.config_value is MISSING else d.config_value
        value = given[d.name] if d.name in given else entry.get(d.config_key, default)
        always = s.always(entry) if callable(s.always) else s.always
        if (s.skip is not None and s.skip(entry)) or value is None or (value == d.default and not always):
            continue
        if s.kind is bool:
            opts.append(d.flag if value else "--no-" + d.flag[2:])
        elif s.nargs == "?" and value == s.const:
            opts.append(d.flag)  # the bare flag
        else:
            opts.append(f"{d.flag} {format_value(value)}")
    return opts


def result_neutral(cls: type) -> frozenset[str]:
    """The fields of ``cls`` that do not change what the stage computes."""
    return frozenset(d.name for d in declared(cls) if not d.setting.result)


def _yaml_value(value: Any) -> str:
    """A config value as YAML spells it (true, [a, b])."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    return str(value)


def markdown_table(cls: type, prefix: str = "") -> str:
    """The config keys of ``cls`` as a markdown table: key, default, rerun trigger, meaning."""
    rows = ["| key | default | changes the result | meaning |", "|---|---|---|---|"]
    for d in config_settings(cls):
        value = d.config_value
        default = "(required)" if value is MISSING else ("null" if value is None else f"`{_yaml_value(value)}`")
        meaning = (d.setting.config_help or d.setting.help).replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{prefix}{d.config_key}` | {default} | {'yes' if d.setting.result else 'no'} | {meaning} |")
    return "\n".join(rows) + "\n"


@dataclass(frozen=True)
class SchemaBlock:
    """A block of a text file generated from declarations, between two marker lines (a
    schema's keys in YAML, a settings table in markdown): :meth:`generated` is the file as the
    declarations make it, :meth:`write` rewrites the block, :meth:`check` says whether the file
    is up to date. ``make(indent)`` gives the block's lines, indented as the marker lines are."""

    name: str  # what the block is generated from, named in the marker lines
    regenerate: str  # the command that rewrites it
    make: Callable[[int], str]
    comment: tuple[str, str] = ("#", "")  # how the file writes a comment line: ("<!--", "-->") in markdown

    def _marker(self, text: str) -> str:
        before, after = self.comment
        return f"{before} {text}{' ' + after if after else ''}"

    @property
    def begin(self) -> str:
        return self._marker(f">>> generated from {self.name} by `{self.regenerate}`; do not edit by hand")

    @property
    def end(self) -> str:
        return self._marker(f"<<< end of the block generated from {self.name}")

    def _span(self, text: str, path: Path) -> tuple[int, int, int]:
        begin, end = text.find(self.begin), text.find(self.end)
        if begin < 0 or end < begin:
            raise ValueError(f"{path}: the marker lines of the generated block are missing ({self.begin!r} ... {self.end!r})")
        start = text.rfind("\n", 0, begin) + 1
        stop = text.find("\n", end) + 1 or len(text)
        return start, stop, begin - start

    def generated(self, path: Path) -> str:
        text = Path(path).read_text(encoding="utf-8")
        start, stop, indent = self._span(text, path)
        pad = " " * indent
        body = self.make(indent)
        return f"{text[:start]}{pad}{self.begin}\n{body}{'' if body.endswith(chr(10)) else chr(10)}{pad}{self.end}\n{text[stop:]}"

    def write(self, path: Path) -> bool:
        """Rewrite the block; True when the file changed."""
        new = self.generated(path)
        changed = new != Path(path).read_text(encoding="utf-8")
        if changed:
            Path(path).write_text(new, encoding="utf-8")
        return changed

    def check(self, path: Path) -> bool:
        """Whether the file's block is what the declarations generate now."""
        return self.generated(path) == Path(path).read_text(encoding="utf-8")

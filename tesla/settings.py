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
import math
import re
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from tesla.arguments import finite_float
from tesla.errors import TeslaError
from tesla.files import atomic_output

__all__ = [
    "Setting",
    "Declared",
    "setting",
    "declared",
    "add_arguments",
    "from_args",
    "schema_properties",
    "schema_yaml",
    "command_options",
    "declared_option",
    "result_neutral",
    "markdown_table",
    "SchemaBlock",
    "REGENERATE",
    "generated_blocks",
    "Wording",
    "bound_problems",
    "message_value",
    "config_value",
    "resume_tunable",
]

#: the config key of a setting that the workflow sets itself (no config key)
NOT_IN_CONFIG = None
_UNSET = object()


@dataclass(frozen=True)
class Setting:
    """The declaration of one setting (its default is the dataclass field's)."""

    help: str
    #: str, int, float, bool or Path; a bool with default False is a flag, with default True a
    #: --no- flag, with default None a --x/--no-x pair. A settings dataclass: a block of config
    #: keys (no option; an object in the schema, default {}, its keys' rows in the table)
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
    #: the name of a mutually exclusive group of options ('' = none): at most one of them is given,
    #: exactly one where its members are declared ``required`` (all or none of them)
    exclusive: str = ""
    #: its key in a config entry: '' = the field's name; None = not a config key (the workflow sets it)
    config: str | None = ""
    #: the config schema's description when it differs from ``help``
    config_help: str = ""
    #: the value's JSON schema when kind, bounds and choices say too little
    schema: Mapping[str, Any] | None = None
    #: changes what the stage computes (False: where, how often, how loudly, within which limits)
    result: bool = True
    #: written on the workflow's command line even at its default (what earlier workflows wrote,
    #: so that their jobs are not rerun); a callable decides from the config entry
    always: bool | Callable[[Mapping[str, Any]], bool] = False
    #: left off the workflow's command line in every case: a callable returning True skips it
    skip: Callable[[Mapping[str, Any]], bool] | None = None
    #: exclusive lower bound of a number (a value must be above it)
    above: float | None = None
    #: the config key's default when it differs from the command line's (whose default, e.g.
    #: None for "not given", lets the stage tell a value given from one left out), or the
    #: default as the config schema writes it where earlier schemas spelt it otherwise
    #: (``1000`` for a float 1000.0): the workflow fills in, and writes, the same value as before
    config_default: Any = _UNSET
    #: how a config value becomes the setting's value (an older config's spelling), or None
    from_config: Callable[[Any], Any] | None = None
    #: may change when a run resumes from its checkpoint (all other settings must match it)
    resume_tunable: bool = False

    def value_type(self) -> Callable[[str], Any]:
        """The command line's type of a value: a float is finite, a bounded number is checked."""
        base: Callable[[str], Any] = finite_float if self.kind is float else self.kind
        if self.minimum is None and self.maximum is None and self.above is None:
            return base
        setting = self

        def bounded(text: str) -> Any:
            value = base(text)
            if not setting.within_bounds(value):
                raise argparse.ArgumentTypeError(f"{value} is outside the allowed range {setting.bounds()}")
            return value

        bounded.__name__ = f"{self.kind.__name__} {self.bounds()}"
        return bounded

    def within_bounds(self, value: float) -> bool:
        low, high, above = self.minimum, self.maximum, self.above
        return not ((low is not None and value < low) or (high is not None and value > high) or (above is not None and value <= above))

    def bounds(self) -> str:
        """'>= 1', '0-1', 'above 0': the allowed range, as messages write it."""
        if self.above is not None:
            return f"above {self.above:g}" + ("" if self.maximum is None else f" and <= {self.maximum:g}")
        return _range(self.minimum, self.maximum)

    def resolved_choices(self) -> tuple | None:
        """The choices; a callable is asked (a registry that lives in a module the declaration
        must not import when it loads, e.g. one that needs torch)."""
        return self.choices() if callable(self.choices) else self.choices


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
    def is_block(self) -> bool:
        """A block of config keys (its kind is a settings dataclass)."""
        return dataclasses.is_dataclass(self.setting.kind)

    @property
    def config_default(self) -> Any:
        """The default of the config key (the field's, unless declared otherwise; a block's: {},
        each of its keys at its own default)."""
        if self.setting.config_default is not _UNSET:
            return self.setting.config_default
        return {} if self.is_block else self.default


def declared(cls: type) -> list[Declared]:
    """The declared settings of a settings dataclass, in declaration order."""
    out = []
    for f in dataclasses.fields(cls):
        decl = f.metadata.get("setting")
        if decl is not None:
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            out.append(Declared(f.name, default, decl))
    return out


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
    if (s.required or not d.has_default) and not s.exclusive:  # a required exclusive group: one of its members
        kw["required"] = True
    else:
        kw["default"] = d.default
    for key in ("nargs", "metavar"):
        if getattr(s, key) is not None:
            kw[key] = getattr(s, key)
    if s.choices is not None:
        kw["choices"] = s.resolved_choices()
    if s.nargs == "?":
        kw["const"] = s.const
    return [d.flag], kw


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: frozenset[str] = frozenset()) -> None:
    """The options of every declared setting of ``cls`` (but ``skip``), grouped as declared
    (argument groups by title; mutually exclusive groups by name, within their argument group)."""
    groups: dict[str, Any] = {"": parser}
    exclusive: dict[str, Any] = {}
    for d in declared(cls):
        if d.name in skip:
            continue
        title = d.setting.group
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        container = groups[title]
        if d.setting.exclusive:
            container = _exclusive_group(exclusive, container, d)
        flags, kw = _argument(d)
        container.add_argument(*flags, **kw)


def _exclusive_group(groups: dict[str, Any], container: Any, d: Declared) -> Any:
    """The mutually exclusive group ``d`` is declared in (made at its first member, in that
    member's argument group); required when its members are."""
    name = d.setting.exclusive
    if name not in groups:
        groups[name] = container.add_mutually_exclusive_group(required=d.setting.required)
    elif groups[name].required != d.setting.required:
        raise ValueError(f"{d.name}: the members of the exclusive group {name!r} must all be required or none")
    return groups[name]


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
    if d.is_block:
        return {"type": "object"}
    if s.kind is Path:
        value: dict[str, Any] = {"$ref": "#/$defs/path"}
    elif s.choices is not None:
        return {"enum": [*s.resolved_choices(), *([None] if d.config_default is None else [])]}
    else:
        kind = {bool: "boolean", int: "integer", float: "number", str: "string"}[s.kind]
        value = {"type": kind, **({"minLength": 1} if s.kind is str else {})}
        bounds = (("minimum", s.minimum), ("exclusiveMinimum", s.above), ("maximum", s.maximum))
        value.update({k: v for k, v in bounds if v is not None})
    return value if d.config_default is not None else {"anyOf": [value, {"type": "null"}]}


def schema_properties(cls: type) -> dict[str, dict[str, Any]]:
    """The JSON-schema properties of the config keys of ``cls``'s settings (a block's keys nested
    in its own; a setting without help has no description)."""
    properties = {}
    for d in config_settings(cls):
        text = d.setting.config_help or d.setting.help
        entry: dict[str, Any] = {**({"description": text} if text else {}), **_value_schema(d)}
        if d.has_default:
            entry["default"] = d.config_default
        if d.is_block:
            entry.update(additionalProperties=False, properties=schema_properties(d.setting.kind))
        properties[d.config_key] = entry
    return properties


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
    the default; names in ``order`` come first, in that order, then the rest as declared.
    ``given``: values the workflow sets itself, by field name (a setting that is no config key,
    such as the IPC, or one whose config value the workflow resolves, such as one engine of a
    list); they are written whether or not the entry has a key of that name."""
    given = given or {}
    rank = {name: i for i, name in enumerate(order)}
    chosen = [d for d in declared(cls) if (d.config_key is not None or d.name in given) and d.setting.result == result]
    opts = []
    for d in sorted(chosen, key=lambda d: rank.get(d.name, len(rank))):
        value = given[d.name] if d.name in given else config_value(d, entry)
        option = _option(d, value, entry)
        if option is not None:
            opts.append(option)
    return opts


def declared_option(cls: type, name: str, value: Any) -> str:
    """The option of ``cls``'s setting ``name`` with ``value``, written whatever its default and
    ``skip`` (for an option the workflow writes apart from :func:`command_options`)."""
    [d] = [d for d in declared(cls) if d.name == name]
    return f"{d.flag} {format_value(value)}"


def config_value(d: Declared, entry: Mapping[str, Any]) -> Any:
    """The setting's value in a config entry: its key's (read by ``from_config``), else its
    config default."""
    if d.config_key not in entry:
        return d.config_default if d.has_default else None
    value = entry[d.config_key]
    return d.setting.from_config(value) if d.setting.from_config else value


def _option(d: Declared, value: Any, entry: Mapping[str, Any]) -> str | None:
    """One option of the workflow's command line, or None when it is left off."""
    s = d.setting
    always = s.always(entry) if callable(s.always) else s.always
    if (s.skip is not None and s.skip(entry)) or value is None or (value == d.default and not always):
        return None
    if s.kind is bool:
        return d.flag if value else "--no-" + d.flag[2:]
    if s.nargs == "?" and value == s.const:
        return d.flag  # the bare flag
    return f"{d.flag} {format_value(value)}"


def result_neutral(cls: type) -> frozenset[str]:
    """The fields of ``cls`` that do not change what the stage computes."""
    return frozenset(d.name for d in declared(cls) if not d.setting.result)


def markdown_table(cls: type, prefix: str = "") -> str:
    """The config keys of ``cls`` as a markdown table: key, default, rerun trigger, meaning (a
    block's keys as rows of their own, ``<block>.<key>``)."""
    rows = ["| key | default | changes the result | meaning |", "|---|---|---|---|", *_table_rows(cls, prefix)]
    return "\n".join(rows) + "\n"


def _table_rows(cls: type, prefix: str) -> Iterator[str]:
    for d in config_settings(cls):
        if d.is_block:
            yield from _table_rows(d.setting.kind, f"{prefix}{d.config_key}.")
            continue
        default = "(required)" if not d.has_default else ("null" if d.config_default is None else f"`{_yaml_flow(d.config_default)}`")
        meaning = (d.setting.config_help or d.setting.help).replace("|", "\\|").replace("\n", " ")
        yield f"| `{prefix}{d.config_key}` | {default} | {'yes' if d.setting.result else 'no'} | {meaning} |"


@dataclass(frozen=True)
class SchemaBlock:
    """A block of a text file generated from declarations, between two marker lines (a
    schema's keys in YAML, a settings table in markdown): :meth:`generated` is the file as the
    declarations make it, :meth:`write` rewrites the block, :meth:`check` says whether the file
    is up to date (:func:`write_blocks` rewrites several at once). ``make(indent)`` gives the block's
    lines, indented as the marker lines are."""

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
        """(start of the begin line, end of the end line, the markers' indent); each marker is a
        whole line (one block's end marker may begin another's)."""
        begin = _marker_line(self.begin).search(text)
        end = _marker_line(self.end).search(text, begin.end()) if begin else None
        if begin is None or end is None:
            raise TeslaError(
                f"{path}: the marker lines of the block generated from {self.name} are missing or out of order; put "
                f"back the two lines {self.begin!r} and {self.end!r} where the block belongs (git diff {path} shows "
                f"what changed), then run {self.regenerate}"
            )
        stop = min(end.end() + 1, len(text))
        return begin.start(), stop, len(begin.group(0)) - len(begin.group(0).lstrip(" \t"))

    def apply(self, text: str, path: Path) -> str:
        """``text`` (the content of ``path``) with this block as the declarations make it now."""
        start, stop, indent = self._span(text, path)
        pad = " " * indent
        body = self.make(indent)
        return f"{text[:start]}{pad}{self.begin}\n{body}{'' if body.endswith(chr(10)) else chr(10)}{pad}{self.end}\n{text[stop:]}"

    def generated(self, path: Path) -> str:
        return self.apply(Path(path).read_text(encoding="utf-8"), path)

    def write(self, path: Path) -> bool:
        """Rewrite the block, all or nothing (:func:`write_blocks`); True when the file changed."""
        return bool(write_blocks([(path, self)]))

    def check(self, path: Path) -> bool:
        """Whether the file's block is what the declarations generate now."""
        return self.generated(path) == Path(path).read_text(encoding="utf-8")


def _marker_line(marker: str) -> re.Pattern[str]:
    """A marker as a whole line of a file, indented or not."""
    return re.compile(rf"^[ \t]*{re.escape(marker)}[ \t]*$", re.MULTILINE)


def write_blocks(blocks: Iterable[tuple[Path, SchemaBlock]]) -> list[Path]:
    """Rewrite the generated blocks of their files: every file's new text is made first (a file
    whose marker lines are missing is refused before any file is written), then each changed
    file is replaced whole (:func:`tesla.files.atomic_output`: a file is never left half
    written). Returns the files that changed."""
    texts: dict[Path, str] = {}
    for path, block in blocks:
        path = Path(path)
        texts[path] = block.apply(texts[path] if path in texts else path.read_text(encoding="utf-8"), path)
    changed = [path for path, text in texts.items() if text != path.read_text(encoding="utf-8")]
    for path in changed:
        with atomic_output(path) as tmp:
            tmp.write_text(texts[path], encoding="utf-8")
    return sorted(changed)


#: the command that rewrites every generated block (:mod:`tesla.settings_blocks`)
REGENERATE = "python -m tesla.settings_blocks --write"


def generated_blocks(name: str, cls: type, prefix: str = "") -> tuple[SchemaBlock, SchemaBlock]:
    """The two blocks generated from the declarations of ``cls``, named ``name`` in their marker
    lines: its config keys in the schema (:func:`schema_yaml`) and its table in config/README.md
    (:func:`markdown_table`, keys under ``prefix``)."""
    return (
        SchemaBlock(name, REGENERATE, schema_yaml(cls)),
        SchemaBlock(name, REGENERATE, lambda indent: markdown_table(cls, prefix), comment=("<!--", "-->")),
    )


# ---------------------------------------------------------------------------------------
# checks and names of settings objects; the YAML of a schema block
# ---------------------------------------------------------------------------------------
def resume_tunable(cls: type) -> frozenset[str]:
    """The fields of ``cls`` that may change when a run resumes from its checkpoint."""
    return frozenset(d.name for d in declared(cls) if d.setting.resume_tunable)


def bound_problems(obj: Any, name: Callable[[str], str]) -> list[str]:
    """'<name> must be ..., got <value>' for every declared number of the settings object
    ``obj`` outside its bounds (or, a float, not finite); None passes (an unset setting).
    ``name`` names a setting in the message (its flag, or its config key)."""
    problems = []
    for d in declared(type(obj)):
        s, value = d.setting, getattr(obj, d.name)
        if s.kind not in (int, float) or value is None or isinstance(value, bool):
            continue
        bounded = s.minimum is not None or s.maximum is not None or s.above is not None
        if (s.kind is float and not math.isfinite(value)) or (bounded and not s.within_bounds(value)):
            what = "an integer" if s.kind is int else "a finite number"
            problems.append(f"{name(d.name)} must be {what}{' ' + s.bounds() if bounded else ''}, got {value!r}")
    return problems


@dataclass(frozen=True)
class Wording:
    """How a message names a setting: by the command-line flag that set it (``--lr-lr``) or,
    when the workflow runs the command, by its config key (``datasets.demo.distill.1.lr_lr``,
    with ``config_key_prefix`` = ``datasets.demo.distill.1``)."""

    config_key_prefix: str | None = None

    @property
    def in_workflow(self) -> bool:
        return bool(self.config_key_prefix)

    def name(self, setting: str) -> str:
        if self.in_workflow:
            return f"{self.config_key_prefix}.{setting}"
        return "--" + setting.replace("_", "-")

    def names(self, settings: tuple[str, ...] | list[str], values: Mapping[str, Any], joiner: str = " or ") -> str:
        """'--lr-teacher (now 100) or --syn-steps (now 10)'."""
        return joiner.join(f"{self.name(k)} (now {message_value(values[k])})" for k in settings)


def message_value(value: Any) -> str:
    """1e+06 for floats (%g), str() for the rest."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def schema_yaml(cls: type) -> Callable[[int], str]:
    """The ``make`` of a :class:`SchemaBlock` that writes :func:`schema_properties` of ``cls``
    (:func:`properties_yaml`)."""
    return properties_yaml(lambda: schema_properties(cls))


def properties_yaml(properties: Callable[[], Mapping[str, Mapping[str, Any]]]) -> Callable[[int], str]:
    """The ``make`` of a :class:`SchemaBlock` that writes JSON-schema ``properties()`` as YAML
    lines, indented as the markers are: one mapping per key, its description folded, a list
    one item a line, the other values in flow style."""

    def make(indent: int) -> str:
        return "".join(" " * indent + line + "\n" for line in _properties_lines(properties()))

    return make


def _properties_lines(properties: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The YAML lines of schema properties; a block's own properties nested, indented by four."""
    lines = []
    for key, entry in properties.items():
        lines.append(f"{key}:")
        for name, value in entry.items():
            if name == "properties" and isinstance(value, dict) and all(isinstance(v, dict) for v in value.values()):
                lines += ["  properties:", *("    " + line for line in _properties_lines(value))]
            else:
                lines += _yaml_item(name, value)
    return lines


def _yaml_item(name: str, value: Any, width: int = 100) -> list[str]:
    """The lines of one key of a schema entry, indented by two."""
    import textwrap

    if name == "description" and len(value) > width - 20:
        return ["  description: >-", *textwrap.wrap(value, width, initial_indent="    ", subsequent_indent="    ")]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [f"  {name}:", *(f"    - {_yaml_flow(v)}" for v in value)]
    return [f"  {name}: {_yaml_flow(value)}"]


def _yaml_flow(value: Any) -> str:
    """A value in YAML's flow style, on one line."""
    import yaml  # only where a block is written or checked

    value = list(value) if isinstance(value, tuple) else value
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6)
    return text.removesuffix("\n...\n").strip()

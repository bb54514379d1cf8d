"""The settings of the live curves, each declared once (:mod:`tesla.settings`); no torch and no
tracker package at import (the workflow reads them while it builds the job graph).

* :class:`TrackerOptions`: the ``--tracker*`` options of every stage that trains (``tesla
  experts``, ``tesla distill``, ``tesla evaluate``); their parser comes from the declaration.
* :class:`TrackingBlock`: the config's ``tracking:`` block, with its ``tensorboard:``
  (:class:`TensorboardBlock`) and ``wandb:`` (:class:`WandbBlock`) blocks; their keys in
  workflow/schemas/config.schema.yaml and their rows in config/README.md are generated
  (:data:`SCHEMA_BLOCKS`, :data:`README_BLOCKS`; ``python -m tesla.settings_blocks --write``).

The config's keys are not one per option: the workflow derives a job's ``--tracker-dir`` and
``--tracker-group`` from its output (:func:`tesla.tracking.workflow_options`), so a key is
declared apart from the option it feeds, with the option's default and choices. ``none`` is
the config's spelling of no tracker (the command line: no ``--tracker``). None of these
settings changes a result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tesla.settings import SchemaBlock, generated_blocks, setting

__all__ = [
    "GROUP_TITLE",
    "NO_TRACKER",
    "README_BLOCKS",
    "SCHEMA_BLOCKS",
    "TRACKERS",
    "TensorboardBlock",
    "TrackerOptions",
    "TrackingBlock",
    "WANDB_MODES",
    "WandbBlock",
]

#: tracker name -> (the module it imports, the pip extra of pyproject.toml that installs it)
TRACKERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
}
#: the config's name of no tracker
NO_TRACKER = "none"
WANDB_MODES: tuple[str, ...] = ("offline", "online")
#: the argparse group of the options
GROUP_TITLE = "live curves (optional; never changes a result; docs/tracking.md)"
#: a key whose value is a non-empty string or null (the schema's definition "path")
_STRING_OR_NULL = {"$ref": "#/$defs/path"}


def _option(default: Any, help: str, **declaration: Any) -> Any:
    """A ``--tracker*`` option: never a config key, never changes a result."""
    return setting(default, help=help, config=None, result=False, group=GROUP_TITLE, **declaration)


@dataclass(frozen=True)
class TrackerOptions:
    """The ``--tracker*`` options of a stage (``tracker`` None: no tracking)."""

    tracker: str | None = _option(
        None, choices=tuple(TRACKERS),
        help="also log the curves to TensorBoard or Weights & Biases (needs the pip extra of that name)",
    )
    tracker_dir: str | None = _option(
        None, metavar="DIR",
        help="tensorboard: the event folder (default: a folder 'tensorboard' beside the output); wandb: where it "
             "writes its run folders (DIR/wandb; default: the current folder)",
    )
    #: written by the workflow at its default too (as it always was)
    tracker_project: str = _option("tesla", always=True, help="wandb: project")
    tracker_entity: str | None = _option(None, help="wandb: entity (team or user)")
    tracker_group: str | None = _option(None, help="wandb: group of runs (e.g. one dataset and IPC)")
    tracker_mode: str = _option(
        WANDB_MODES[0], choices=WANDB_MODES, always=True,
        help="wandb: offline (files only; 'wandb sync' uploads them later) or online",
    )
    tracker_name: str | None = _option(None, help="the run's display name (default: the job's output)")


# ---------------------------------------------------------------------------------------
# the config's `tracking:` block
# ---------------------------------------------------------------------------------------
def _key(default: Any, help: str, **declaration: Any) -> Any:
    """A key of the ``tracking:`` block: never changes a result."""
    return setting(default, help=help, result=False, **declaration)


@dataclass(frozen=True)
class TensorboardBlock:
    """``tracking.tensorboard``: where TensorBoard's events go."""

    dir: str | None = _key(
        None, schema=_STRING_OR_NULL,
        help="folder of the event files (one subfolder per job, named like its results); null = a folder "
             "tensorboard/ beside each job's outputs",
    )


@dataclass(frozen=True)
class WandbBlock:
    """``tracking.wandb``: the W&B run of every job (its group derived per target unless given)."""

    project: str = _key(TrackerOptions.tracker_project, help="W&B project")
    entity: str | None = _key(None, schema=_STRING_OR_NULL,
                              help="W&B entity (team or user); null = the account's default")
    group: str | None = _key(
        None, schema=_STRING_OR_NULL,
        help="W&B group of every run; null = one group per dataset and IPC (<dataset>_ipc<N>; experts: "
             "<dataset>_experts), so all jobs of one target show together",
    )
    mode: str = _key(
        TrackerOptions.tracker_mode, choices=WANDB_MODES,
        help="offline (run folders only, upload later with `wandb sync`; for nodes without network) or online",
    )
    #: the workflow's default of --tracker-dir with W&B (the command line's: the current folder)
    dir: str = _key("results", help="folder in which W&B writes its run folders (DIR/wandb)")


@dataclass(frozen=True)
class TrackingBlock:
    """The config's ``tracking:`` block (its own description and type are the schema's)."""

    tracker: str = _key(NO_TRACKER, choices=(NO_TRACKER, *TRACKERS), help="none (off), tensorboard or wandb")
    tensorboard: TensorboardBlock = _key(TensorboardBlock(), kind=TensorboardBlock, help="")
    wandb: WandbBlock = _key(WandbBlock(), kind=WandbBlock, help="")


# ---------------------------------------------------------------------------------------
# generated blocks
# ---------------------------------------------------------------------------------------
_SCHEMA, _TABLE = generated_blocks("tesla.tracking_settings.TrackingBlock", TrackingBlock, "tracking.")
#: the schema's ``tracking:`` properties (workflow/schemas/config.schema.yaml)
SCHEMA_BLOCKS: dict[str, SchemaBlock] = {"tracking": _SCHEMA}
#: their table in config/README.md
README_BLOCKS: dict[str, SchemaBlock] = {"tracking": _TABLE}

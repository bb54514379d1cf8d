"""Every block of the project's files that is generated from declarations, rewritten in one go::

    python -m tesla.settings_blocks --write     # from the project's root
    python -m tesla.settings_blocks --check     # exit 1 when a block is out of date

(exit 2, with one line naming the file and the fix, when a file or a block's marker lines are missing)

The blocks: the config's top-level keys and their table (:mod:`tesla.config_settings`), the
config schema's keys of a distill row and the distill settings table of
config/README.md (from :mod:`tesla.distill_settings`: the settings of ``tesla distill``, and
the row's other keys, ``DistillRow``), the keys and tables of the experts'
and the evaluation's settings (:mod:`tesla.training_settings`), a dataset entry's ``zca_eps``
and its table (:mod:`tesla.zca_settings`), the ``tracking:`` block's keys and table
(:mod:`tesla.tracking_settings`), and the data sources' keys of a dataset entry
(:mod:`tesla.data.sources.workflow`). A test
(tests/test_settings_blocks.py) fails while a committed file differs from what the
declarations generate.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tesla.config_settings import TopLevel
from tesla.data.sources.workflow import SCHEMA_BLOCK as DATA_SOURCES
from tesla.distill_settings import DistillRow, DistillSettings
from tesla.errors import TeslaError
from tesla.settings import REGENERATE, SchemaBlock, generated_blocks, write_blocks
from tesla.tracking_settings import README_BLOCKS as TRACKING_README, SCHEMA_BLOCKS as TRACKING_SCHEMA
from tesla.training_settings import BLOCK_FILES
from tesla.zca_settings import ZcaSettings

__all__ = ["BLOCKS", "CONFIG_README", "REGENERATE", "SCHEMA", "main", "stale", "write"]

SCHEMA = Path("workflow/schemas/config.schema.yaml")
CONFIG_README = Path("config/README.md")


def _in_files(name: str, cls: type) -> tuple[tuple[Path, SchemaBlock], ...]:
    schema, table = generated_blocks(name, cls)
    return (SCHEMA, schema), (CONFIG_README, table)


#: (file, block), paths from the project's root
BLOCKS: tuple[tuple[Path, SchemaBlock], ...] = (
    *_in_files("tesla.config_settings.TopLevel", TopLevel),
    *_in_files("tesla.distill_settings", DistillSettings),
    *_in_files("tesla.distill_settings.DistillRow", DistillRow),
    *((Path(name), block) for name, blocks in BLOCK_FILES.items() for block in blocks.values()),
    *_in_files("tesla.zca_settings.ZcaSettings", ZcaSettings),
    (SCHEMA, TRACKING_SCHEMA["tracking"]),
    (CONFIG_README, TRACKING_README["tracking"]),
    (SCHEMA, DATA_SOURCES),
)


def stale(root: Path) -> list[Path]:
    """The files under ``root`` whose generated blocks are out of date."""
    return sorted({root / path for path, block in BLOCKS if not block.check(root / path)})


def write(root: Path) -> list[Path]:
    """Rewrite every generated block under ``root``; the files that changed."""
    return write_blocks((root / path, block) for path, block in BLOCKS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the blocks of the project's files generated from declarations")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", action="store_true", help="rewrite every generated block")
    group.add_argument("--check", action="store_true", help="exit 1 when a generated block is out of date")
    parser.add_argument("--root", type=Path, default=Path("."), help="the project's root (default: here)")
    args = parser.parse_args(argv)
    try:
        return _write(args.root) if args.write else _check(args.root)
    except FileNotFoundError as e:
        print(f"python -m tesla.settings_blocks: {e.filename}: no such file; give --root the project's root", file=sys.stderr)
    except TeslaError as e:  # a file whose marker lines are gone
        print(f"python -m tesla.settings_blocks: {e}", file=sys.stderr)
    return 2


def _write(root: Path) -> int:
    changed = write(root)
    print("updated: " + ", ".join(map(str, changed)) if changed else "every generated block is up to date")
    return 0


def _check(root: Path) -> int:
    out_of_date = stale(root)
    for path in out_of_date:
        print(f"{path}: a generated block is out of date; run {REGENERATE}", file=sys.stderr)
    return 1 if out_of_date else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

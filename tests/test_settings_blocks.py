"""The committed generated blocks (every block of tesla.settings_blocks.BLOCKS: the config
schema's keys and config/README.md's tables of the top-level keys, the distill settings and
rows, the experts, the evaluation, ZCA, tracking, and the data sources' keys) are what the
declarations generate: after changing a declaration, run `python -m tesla.settings_blocks --write`.

Time budget: under a second."""

from __future__ import annotations

import pytest

from tesla.settings_blocks import BLOCKS, REGENERATE, main, stale
from workflow_options import ROOT


def test_every_generated_block_is_up_to_date():
    assert stale(ROOT) == [], f"run {REGENERATE}"


def test_every_block_names_its_source_and_the_command_that_rewrites_it():
    for path, block in BLOCKS:
        text = (ROOT / path).read_text(encoding="utf-8")
        assert block.begin in text and REGENERATE in block.begin and block.name in block.begin


def test_check_fails_on_a_stale_block_and_write_repairs_it(tmp_path, capsys):
    for path, _ in BLOCKS:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text((ROOT / path).read_text())
    schema = tmp_path / "workflow/schemas/config.schema.yaml"
    schema.write_text(schema.read_text().replace("default: 10000", "default: 9999", 1))
    assert main(["--check", "--root", str(tmp_path)]) == 1
    assert main(["--write", "--root", str(tmp_path)]) == 0
    assert main(["--check", "--root", str(tmp_path)]) == 0
    assert schema.read_text() == (ROOT / "workflow/schemas/config.schema.yaml").read_text()


def test_a_file_without_its_markers_is_refused_naming_it_and_left_as_it_was(tmp_path, capsys):
    """A block whose marker lines were edited away: one line naming the file, the block and the
    fix, exit 2 (from --write and --check alike), and no file is rewritten (not even the ones whose markers are there)."""
    for path, _ in BLOCKS:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text((ROOT / path).read_text())
    schema = tmp_path / "workflow/schemas/config.schema.yaml"
    readme = tmp_path / "config/README.md"
    path, block = BLOCKS[-1]  # the last block written: every other file's new text is made before it fails
    assert tmp_path / path == schema
    schema.write_text(schema.read_text().replace(block.end, "# (marker removed)"))
    readme.write_text(readme.read_text().replace("| `iterations` | `10000` |", "| `iterations` | `9999` |", 1))
    before = {p: p.read_text() for p in (schema, readme)}
    for command in ("--write", "--check"):
        assert main([command, "--root", str(tmp_path)]) == 2, command
        err = capsys.readouterr().err
        assert f"{schema}: the marker lines of the block generated from {block.name} are missing" in err, command
        assert "Traceback" not in err and block.end in err
    assert {p: p.read_text() for p in (schema, readme)} == before
    assert {p for p in tmp_path.rglob("*") if p.is_file()} == {tmp_path / p for p, _ in BLOCKS}  # no temporary file left


@pytest.mark.parametrize("command", ["--write", "--check"])
def test_a_root_without_the_files_is_refused_naming_the_file(tmp_path, capsys, command):
    """--root given a folder that is not the project's: one line naming the missing file and
    the fix, exit 2, nothing written."""
    assert main([command, "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / BLOCKS[0][0]}: no such file" in err and "--root" in err
    assert list(tmp_path.iterdir()) == []


def _descriptions(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "description" and isinstance(value, str):
                yield value
            else:
                yield from _descriptions(value)
    elif isinstance(node, list):
        for value in node:
            yield from _descriptions(value)


def test_every_key_description_of_the_schema_is_one_line():
    """A config error quotes the description of the key it names after the problem (common.smk's
    schema errors), so each is one line (a folded ``>`` scalar would end in a line break)."""
    import yaml

    schema = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    broken = [text for text in _descriptions(schema["properties"]) if "\n" in text]
    broken += [text for text in _descriptions(schema["$defs"]) if "\n" in text]
    assert broken == []

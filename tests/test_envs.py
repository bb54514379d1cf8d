"""The conda environment (workflow/envs/tesla.yaml) installs what pyproject.toml declares, with
the same lower bounds, and its pip part installs this checkout from where conda runs it. The
package needs no Snakemake: the workflow's packages are the extra `workflow`, which the
README's commands (and .ci/run, the README's test command) install."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ENV_FILE = ROOT / "workflow" / "envs" / "tesla.yaml"
# conda-forge names of the pip packages that are published there under another name
CONDA_NAMES = {"torch": "pytorch-gpu", "matplotlib": "matplotlib-base", "snakemake": "snakemake-minimal"}
SPEC = re.compile(r"^([A-Za-z0-9_.\-]+)\s*(>=\s*[0-9][^,<;\s]*)?")


def _bounds(specs: list[str]) -> dict[str, str | None]:
    out = {}
    for spec in specs:
        name, bound = SPEC.match(spec).groups()
        out[name.lower()] = bound.replace(" ", "") if bound else None
    return out


def _environment() -> dict:
    return yaml.safe_load(ENV_FILE.read_text())


def _pip_part() -> list[str]:
    return next(d["pip"] for d in _environment()["dependencies"] if isinstance(d, dict))


def test_conda_packages_have_the_lower_bounds_of_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    optional = [spec for name, specs in extras.items() if name != "test" for spec in specs]  # e.g. the trackers
    declared = _bounds(project["dependencies"] + optional)
    conda = _bounds([d for d in _environment()["dependencies"] if isinstance(d, str)])
    for name, bound in declared.items():
        conda_name = CONDA_NAMES.get(name, name)
        assert conda_name in conda, f"{ENV_FILE.name} lacks {conda_name} (pyproject.toml: {name}{bound or ''})"
        assert conda[conda_name] == bound, f"{conda_name}{conda[conda_name]} in {ENV_FILE.name}, {name}{bound} in pyproject.toml"
    extra = set(conda) - {CONDA_NAMES.get(n, n) for n in declared} - {"python", "pip"}
    assert not extra, f"{ENV_FILE.name} installs what pyproject.toml does not declare: {sorted(extra)}"


@pytest.mark.parametrize("where", ["workflow/envs", ".snakemake/conda"])
def test_the_pip_part_installs_this_checkout(where, tmp_path):
    """conda runs pip in the folder of the environment file it reads: workflow/envs for
    `conda env create -f`, .snakemake/conda (Snakemake's copy) for `snakemake --use-conda`
    started in the checkout. From both, the editable path is this checkout and pip builds it."""
    (editable,) = [line.split(maxsplit=1)[1] for line in _pip_part() if line.startswith("-e ")]
    assert (ROOT / where / editable).resolve() == ROOT
    cwd = ROOT / where
    if not cwd.exists():  # .snakemake/conda exists only after a --use-conda run: same depth in a copy
        cwd = tmp_path / "checkout" / where
        cwd.mkdir(parents=True)
        (tmp_path / "checkout" / "pyproject.toml").symlink_to(ROOT / "pyproject.toml")
        (tmp_path / "checkout" / "tesla").symlink_to(ROOT / "tesla")
    requirements = cwd / f"requirements-{where.replace('/', '-')}.txt"
    requirements.write_text("\n".join(_pip_part()) + "\n")
    try:
        run = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index",
                              "--no-build-isolation", "-r", requirements.name], cwd=cwd, capture_output=True, text=True)
    finally:
        requirements.unlink()
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Would install tesla-" in run.stdout


def _readme_commands() -> list[str]:
    """The README's command lines that create the environment."""
    text = (ROOT / "README.md").read_text()
    return [line for line in text.splitlines() if line.startswith("python3 -m venv .venv") and "pip install" in line]


def _installed_extras(command: str) -> set[str]:
    found = re.search(r"pip install -e (?:'\.\[([^\]]*)\]'|\.(?:\s|$))", command)
    assert found, f"no `pip install -e .` in {command!r}"
    return set(filter(None, (found.group(1) or "").split(",")))


def test_the_workflows_packages_are_an_extra_that_the_readme_commands_install():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    needed = {"snakemake", "snakemake-executor-plugin-slurm"}
    assert not needed & set(_bounds(project["dependencies"])), "the package itself must not need Snakemake"
    extras = project["optional-dependencies"]
    assert needed <= set(_bounds(extras["workflow"]))
    assert "tesla[workflow]" in extras["test"], "the tests run the workflow: the extra `test` includes `workflow`"
    commands = _readme_commands()
    assert len(commands) == 2, commands  # the demo, the tests
    for command in commands:
        extras_installed = _installed_extras(command)
        assert extras_installed & {"workflow", "test"}, f"{command!r} runs Snakemake without installing it"
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in commands, f".ci/run's command {ci!r} is not the README's"

"""Helpers shared by the workflow tests (test_workflow*.py, test_slurm.py,
test_rerun_after_kill.py): a copy of the workflow in a temporary folder, the real
``snakemake`` of this environment, a stand-in ``tesla`` command, and the jobs a dry run
plans."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = shutil.which("snakemake", path=str(Path(sys.executable).parent)) or shutil.which("snakemake")

#: a stand-in for the `tesla` command: writes the files each stage's options name
FAKE_TESLA = textwrap.dedent(
    """\
    #!{python}
    import sys
    from pathlib import Path

    argv = sys.argv[1:]
    command = argv[0]

    def values(flag):
        out = []
        for i, a in enumerate(argv):
            if a == flag:
                for b in argv[i + 1:]:
                    if b.startswith("--"):
                        break
                    out.append(b)
        return out

    def write(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(" ".join(argv) + "\\n")

    if command == "prepare":
        d = values("--out-dir")[0]
        for name in ("train.h5", "test.h5", "prepare_report.txt"):
            write(f"{{d}}/{{name}}")
        if values("--validation-per-class"):
            write(f"{{d}}/val.h5")
    if command == "distill" and values("--keep-every"):
        write(str(Path(values("--out")[0]).with_suffix(".kept")) + "/iteration_000001.h5")
    for flag in ("--out", "--metrics", "--curves", "--grid", "--sets-out"):
        for path in values(flag):
            write(path)
    for d in values("--grid-dir"):
        write(f"{{d}}/final.png")
    print("fake tesla", *argv)
    """
)


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def make_workdir(dest: Path) -> Path:
    """A copy of the workflow (with its conda env file) and its config."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("workflow", "config"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", ".snakemake"))
    return dest


def install_fake_tesla(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "tesla"
    script.write_text(FAKE_TESLA.format(python=sys.executable))
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return folder


def install_wrapping_tesla(folder: Path, template: str, stand_in: Path) -> Path:
    """A folder whose `tesla` wraps the stand-in of :func:`install_fake_tesla` (a failure or a
    hang in front of it): `template` is a Python script with {python} and {fake} to fill."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "tesla"
    script.write_text(template.format(python=sys.executable, fake=str(install_fake_tesla(stand_in) / "tesla")))
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return folder


def snakemake(workdir: Path, *args: str, path_prefix: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join(
        ([str(path_prefix)] if path_prefix else []) + [str(Path(sys.executable).parent), env.get("PATH", "")]
    )
    env.pop("SNAKEMAKE_PROFILE", None)
    return subprocess.run(
        [SNAKEMAKE, *args],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def load_config(workdir: Path) -> dict:
    return yaml.safe_load((workdir / "config" / "config.yaml").read_text())


def write_config(workdir: Path, cfg: dict, name: str = "config/config.yaml") -> Path:
    path = workdir / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


_JOB = re.compile(r"^rule (\w+):\n((?:[ \t]+.*\n)+)", re.MULTILINE)


def planned_jobs(output: str) -> dict[str, set[str]]:
    """rule -> output files of the jobs a dry run lists (rule 'all' left out)."""
    jobs: dict[str, set[str]] = {}
    for rule, body in _JOB.findall(output):
        if rule == "all":
            continue
        outputs = re.search(r"^\s+output: (.*)$", body, re.MULTILINE)
        files = set(outputs.group(1).split(", ")) if outputs else set()
        jobs.setdefault(rule, set()).update(files)
    return jobs


def dry_run(workdir: Path, cfg: dict | None = None, *targets: str) -> dict[str, set[str]]:
    args = [*targets, "--dry-run", "--cores", "1"]
    if cfg is not None:
        write_config(workdir, cfg, "edited.yaml")
        args += ["--configfile", "edited.yaml"]
    result = snakemake(workdir, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return planned_jobs(result.stdout + result.stderr)

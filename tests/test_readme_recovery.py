"""The recovery steps after a killed Snakemake (docs/reruns.md on one machine, docs/slurm.md on a
cluster) list this run's own processes only:
the user's snakemake/tesla processes working in the current folder, not every user's runs
nor the same user's runs in other folders (a shared login node has many)."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"
#: the pages with recovery steps: on one machine, and on a SLURM cluster
PAGES = [DOCS / "reruns.md", DOCS / "slurm.md"]
FINDER = re.compile(r"^for p in \$\(pgrep .*$", re.MULTILINE)


def finder_lines() -> list[str]:
    return [line for page in PAGES for line in FINDER.findall(page.read_text())]


def test_every_recovery_section_uses_the_same_finder_and_no_bare_pgrep():
    for page in PAGES:
        assert FINDER.search(page.read_text()), f"{page.name} has no recovery steps"
        assert not re.search(r"^pgrep -af", page.read_text(), re.MULTILINE), page.name
    assert len(set(finder_lines())) == 1


def _fake_job(cwd: Path, name: str) -> subprocess.Popen:
    """A process whose command line reads like a job of a run working in `cwd`."""
    return subprocess.Popen(["bash", "-c", f'exec -a "{name}" sleep 60'], cwd=cwd)


def test_the_finder_lists_the_processes_of_this_folder_only(tmp_path):
    here, elsewhere = tmp_path / "run", tmp_path / "other-run"
    here.mkdir()
    elsewhere.mkdir()
    ours = [_fake_job(here, "tesla distill --out results/x"), _fake_job(here, "python snakemake --cores all")]
    theirs = [_fake_job(elsewhere, "tesla distill --out results/x"), _fake_job(here, "sleepy helper")]
    try:
        time.sleep(0.3)  # the exec has happened
        script = tmp_path / "finder.sh"  # as typed at a prompt: the shell's own command line is not the finder
        script.write_text(finder_lines()[0] + "\n")
        listed = subprocess.run(["bash", str(script)], cwd=here, capture_output=True, text=True)
        pids = {int(line.split()[0]) for line in listed.stdout.splitlines() if line.strip()}
        assert pids == {p.pid for p in ours}, listed.stdout + listed.stderr
    finally:
        for p in ours + theirs:
            p.kill()
            p.wait()

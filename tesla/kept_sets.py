"""Kept sets: the synthetic set every K iterations of a distillation (``tesla distill --keep-every K``).

The set X_i (with its labels and learned step size) after iteration i = K, 2K, ... and after
the last iteration is written as a ``tesla-synthetic`` file ``iteration_<i, 6 digits>.h5``
into a folder beside the output: ``OUT`` with its suffix replaced by ``.kept``
(``synthetic.h5`` -> ``synthetic.kept/``). The last file is the final set, the same content
as ``OUT``. Evaluation may then select one of them (``tesla evaluate --kept-sets``,
docs/selection.md); keeping them never changes the distillation.

While the run goes on, the sets are written into ``OUT.kept.partial/`` (each file atomically);
the folder is renamed to ``OUT.kept/`` when the run ends. A killed run resumes from its last
checkpoint at iteration c: the sets it kept after c are removed (the resumed run writes them
again, from the same state), those up to c stay, so none is lost or duplicated. A run resumed
from the checkpoint of a finished run (the same command again, or more ``--iterations``) takes
its ``OUT.kept/`` back as the partial folder first (with more ``--iterations``, the earlier run's
last set stays among the kept sets, also when its iteration is not a multiple of K). A run that
starts from iteration 0 starts with an empty folder.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path
from typing import Callable

from tesla.errors import TeslaError

KEPT_SUFFIX = ".kept"
PARTIAL_SUFFIX = ".partial"
_NAME = re.compile(r"^iteration_(\d{6,})\.h5$")


def kept_folder(out: str | Path) -> Path:
    """Where the kept sets of the run writing ``out`` go: ``out`` with the suffix ``.kept``."""
    return Path(out).with_suffix(KEPT_SUFFIX)


def kept_name(iteration: int) -> str:
    return f"iteration_{int(iteration):06d}.h5"


def list_kept(folder: str | Path) -> list[tuple[int, Path]]:
    """The (iteration, file) of every kept set in a folder, by iteration."""
    folder = Path(folder)
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_file() and (m := _NAME.match(p.name))]
    return sorted(found)


def kept_files(folder: str | Path) -> list[tuple[int, Path]]:
    """:func:`list_kept` of a finished run's folder, refused when it is missing or empty."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TeslaError(f"--kept-sets {folder}: no such folder; run 'tesla distill --keep-every K' (it writes OUT.kept/)")
    found = list_kept(folder)
    if not found:
        raise TeslaError(f"--kept-sets {folder}: holds no iteration_<N>.h5 set; rerun 'tesla distill --keep-every K'")
    return found


class Keeper:
    """The kept sets of one run (rank 0 writes them; ``every`` 0: none)."""

    def __init__(self, out: str | Path, every: int, start_iteration: int, writes: bool = True) -> None:
        if every < 0:
            raise TeslaError(f"--keep-every {every}: give a number of iterations >= 1 (0: keep no set)")
        self.every = int(every) if writes else 0
        self.folder = kept_folder(out)
        self.partial = self.folder.with_name(self.folder.name + PARTIAL_SUFFIX)
        if self.every:
            self._resume(start_iteration)

    def _resume(self, iteration: int) -> None:
        """Keep the sets up to ``iteration`` (the state the run starts from), remove the rest."""
        if iteration == 0 and self.partial.exists():
            shutil.rmtree(self.partial)
        if iteration > 0 and not self.partial.exists() and self.folder.is_dir():
            self.folder.rename(self.partial)  # a finished run's sets, resumed from its last checkpoint
        self.partial.mkdir(parents=True, exist_ok=True)
        later = [path for i, path in list_kept(self.partial) if i > iteration]
        for path in later:
            path.unlink()
        if later:
            print(f"tesla distill: removed {len(later)} kept set(s) after iteration {iteration} (written again as the "
                  "run resumes)", file=sys.stderr)

    def after_iteration(self, iteration: int, make_set: Callable[[], object]) -> None:
        """Write the set of ``iteration`` when it is a multiple of ``every``."""
        if self.every and iteration % self.every == 0:
            make_set().save(self.partial / kept_name(iteration))

    def finish(self, final) -> None:
        """Add the final set (when not kept already) and move the folder into place."""
        if not self.every:
            return
        path = self.partial / kept_name(final.iteration)
        if not path.exists():
            final.save(path)
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self.partial.rename(self.folder)

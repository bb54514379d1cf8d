"""bench/gpu_training.sh, the prepared GPU measurement, run at toy size on the CPU.

The script's numbers come from a GPU; here only its mechanics are checked: every step runs
(under its timeout) and writes its table under $OUT. Time: about 1 minute on 2 idle cores
(five Python processes importing torch), several on a loaded machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and coreutils timeout")
def test_gpu_training_script_runs_every_step_at_toy_size(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "TESLA_BENCH_TOY": "1", "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu_training.sh")], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    statuses = [line for line in result.stdout.splitlines() if line.startswith("exit status")]
    assert statuses == [f"exit status 0 ({what})" for what in
                        ("convnet, float32", "convnet, bf16", "convnet_d4, float32", "convnet_d4, bf16", "evaluation groups")]
    for name in ("convnet_float32.md", "convnet_bf16.md", "convnet_d4_float32.md", "convnet_d4_bf16.md"):
        table = (out / name).read_text()
        assert "| today: one expert per process (training.train, torch defaults) |" in table
        precision = "bf16" if "bf16" in name else "float32"
        for row in (f"sequential, K=2, {precision}, channels_last", f"streams, K=1, {precision}, contiguous",
                    f"vmap, K=2, {precision}, contiguous"):
            assert f"| {row} |" in table, (row, table)
        assert f"vmap, K=2, {precision}, channels_last" not in table  # not a valid combination
    groups = (out / "eval_groups.md").read_text()
    assert "| IPC | sequential | streams | vmap |" in groups and "\n| 1 | " in groups
    assert "torch" in (out / "machine.txt").read_text()

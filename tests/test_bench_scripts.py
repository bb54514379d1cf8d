"""The GPU parts of bench/gpu_benchmarks.sh, checked on the CPU.

Their numbers come from a GPU; here only their mechanics are checked: bench/gpu_training.sh runs
every step at toy size (under its timeout) and writes at most 8 files; the benchmark tables are
rewritten after every measurement (a step stopped by its time cap keeps what it measured); every
test of the suite that skips without CUDA is run by some part. Time: about 1.5 minutes on 2 idle
cores (six Python processes importing torch), several on a loaded machine; the rest seconds.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
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
    assert statuses == [f"exit status 0 ({what})" for what in ("convnet, float32", "convnet, bf16", "convnet_d4, float32",
                                                               "convnet_d4, bf16", "models at 64 px", "evaluation groups")]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and "logs.tar.gz" in files, files  # what comes back from a lent machine
    with tarfile.open(out / "logs.tar.gz") as logs:
        assert "./models_64px.log" in logs.getnames()
    models = (out / "models_64px.md").read_text()
    assert "convnet_d1 (8 x 8 x 3, 4 classes):" in models and "convnet_d2 (8 x 8 x 3, 4 classes):" in models
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


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _snapshots(module, monkeypatch) -> list[str]:
    """Every text the module's ``_write`` puts in its output file, in order."""
    seen: list[str] = []
    real = module._write
    monkeypatch.setattr(module, "_write", lambda out, lines: (seen.append("\n".join(lines)), real(out, lines)))
    return seen


def test_the_engine_table_is_written_after_every_measurement(tmp_path, monkeypatch, one_thread):
    bench = _bench("bench_distill")
    seen = _snapshots(bench, monkeypatch)
    out = tmp_path / "engine.md"
    assert bench.engine_benchmark(["--device", "cpu", "--toy", "--modes", "off", "trace", "--settings", "cifar10-ipc10",
                                   "--repeats", "2", "--baseline-rev", "", "--out", str(out)]) == 0
    # warm-ups of off, trace, floor, then two timed rounds: five versions of the file before the final one
    assert len(seen) >= 5
    assert "| trace | not measured yet |" in seen[0] and "timed rounds done: 0 of 2" in seen[0]
    assert "| off | " in seen[3] and "timed rounds done: 1 of 2" in seen[3] and "not measured yet" not in seen[3]
    final = out.read_text()
    assert "timed rounds done" not in final and "| floor | " in final and "not measured yet" not in final


def test_the_training_matrix_is_written_after_every_measurement(tmp_path, monkeypatch, one_thread):
    bench = _bench("bench_training")
    seen = _snapshots(bench, monkeypatch)
    out = tmp_path / "matrix.md"
    monkeypatch.setattr(sys, "argv", ["bench_training.py", "--matrix", "--device", "cpu", "--matrix-models", "convnet_d1:8:4",
                                      "--images", "8", "--batch-size", "8", "--rounds", "2", "--k", "1", "--modes", "sequential",
                                      "--precisions", "float32", "--layouts", "contiguous", "--tf32", "on", "--out", str(out)])
    assert bench.main() == 0
    assert len(seen) == 2 * 2 + 1  # (today + one configuration) x 2 rounds, then the final file
    assert "| today: one expert per process" in seen[0] and "measured so far: 1 of 4 runs" in seen[0]
    assert "| sequential, K=1, float32, contiguous |" not in seen[0] and "| sequential, K=1, float32, contiguous |" in seen[1]
    assert "measured so far" not in out.read_text()


def _cuda_only_tests() -> set[str]:
    """``file::name`` of every test function that is skipped without CUDA (a skipif on
    ``torch.cuda.is_available()``, directly or through a module-level name)."""
    found = set()
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text())
        marks = {t.id for node in tree.body if isinstance(node, ast.Assign) and "cuda.is_available" in ast.unparse(node.value)
                 for t in node.targets if isinstance(t, ast.Name)}
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                decorators = [ast.unparse(d) for d in node.decorator_list]
                if any("cuda.is_available" in d or d in marks for d in decorators):
                    found.add(f"tests/{path.name}::{node.name}")
    return found


def _part_selection(script: str) -> list[str]:
    """The pytest arguments of a part's CUDA_TESTS array."""
    line = next(x for x in (ROOT / "bench" / script).read_text().splitlines() if x.startswith("CUDA_TESTS=("))
    done = subprocess.run(["bash", "-c", f'{line}; printf "%s\\n" "${{CUDA_TESTS[@]}}"'], capture_output=True, text=True, check=True)
    return done.stdout.splitlines()


def _collect_env() -> dict[str, str]:
    """This environment for a `pytest --collect-only` of the parts' selections: the project on
    the path, and without the options the caller gave pytest through PYTEST_ADDOPTS (``-v``
    would change the listing read here)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PYTEST_ADDOPTS", None)
    return env


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_every_test_that_needs_cuda_is_run_by_some_gpu_part():
    needed = _cuda_only_tests()
    assert "tests/test_augment.py::test_same_result_on_cuda" in needed  # the finder finds both kinds of marks
    assert any(n.startswith("tests/test_matching.py::test_cuda_compiled_steps") for n in needed)
    run = set()
    for script in ("gpu_engine.sh", "gpu_training.sh"):
        args = _part_selection(script)
        done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                               *args], cwd=ROOT, capture_output=True, text=True, env=_collect_env())
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        run |= {line.split("[")[0] for line in done.stdout.splitlines() if "::" in line}
    assert needed <= run, f"skipped without CUDA and run by no GPU part: {sorted(needed - run)}"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_entry_point_takes_the_output_folder_and_refuses_what_it_cannot_run(tmp_path):
    def part(*args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(ROOT / "bench" / "gpu_benchmarks.sh"), *args], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "PYTHON": sys.executable, **env}, timeout=300)

    assert part("nonsense").returncode == 2
    done = part("baseline", "--out", str(tmp_path / "b"), TOY="1")
    assert done.returncode == 2 and "no toy size" in done.stderr
    done = part("reproduce", "--out", str(tmp_path / "r"), "--row", "ipc3")
    assert done.returncode == 2 and "--row ipc10 or ipc1" in done.stderr
    done = part("reproduce", "--out", str(tmp_path / "r"), DATA=str(tmp_path / "missing.tar.gz"))
    assert done.returncode == 2 and "missing.tar.gz not found" in done.stderr
    assert "torch" in (tmp_path / "r" / "machine.txt").read_text()  # --out DIR is where the part writes

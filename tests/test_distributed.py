"""One distillation over two processes (torch.distributed, gloo, started by torchrun) gives the
one-process result: the engines on the small functional network of tests/test_matching.py in
float64 (1e-12) and float32 (1e-5), and ``tesla distill`` after K iterations for exact and
tesla with hard, TESLA and learned labels under DSA; a checkpoint resumes with the other number
of processes; a killed rank ends the job with an error and the rerun completes.

All two-process work of the equality tests runs in ONE torchrun launch (tests/distributed_support.py):
a launch costs seconds of imports on a small machine.
"""

from __future__ import annotations

import json
import re
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from tesla.distill import distill
from tesla.distributed import SINGLE, Ranks, detect_launch, first_host
from tesla.errors import TeslaError
from tesla.synthetic import SyntheticSet
from test_distill import settings, toy  # noqa: F401  (the toy split and experts, a module fixture)

ROOT = Path(__file__).resolve().parents[1]
SUPPORT = Path(__file__).with_name("distributed_support.py")
ENGINE_CASES = [(engine, labels) for engine in ("exact", "tesla") for labels in ("none", "tesla", "learned")]

#: tiny tensors: one intra-op thread (tests/conftest.py), as in the torchrun workers
pytestmark = pytest.mark.usefixtures("one_thread")


def torchrun(*args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]


def job_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])}


def case_settings(toy, folder: Path, engine: str, labels: str, **kw):
    """K = 4 iterations (checkpoints every 2) with DSA (the experts' strategy) on the toy split."""
    return settings(toy, folder, engine=engine, soft_labels=labels, **kw)


def rel(a: torch.Tensor | float, b: torch.Tensor | float) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


@pytest.fixture(scope="module")
def two_process_job(toy, tmp_path_factory):
    """The torchrun launch: engines, the six distillations, a resume of a one-process
    checkpoint and a two-process run to be resumed by one process."""
    tmp = tmp_path_factory.mktemp("two")
    distill(case_settings(toy, tmp / "one-then-two", "exact", "none", iterations=2))  # a one-process checkpoint
    runs = [case_settings(toy, tmp / f"{e}-{l}", e, l) for e, l in ENGINE_CASES]
    runs.append(case_settings(toy, tmp / "one-then-two", "exact", "none"))  # resumes it at iteration 2
    runs.append(case_settings(toy, tmp / "two-then-one", "exact", "none", iterations=2))
    job = {"engines": str(tmp / "engines.pt"), "distill": [asdict(s) for s in runs]}
    (tmp / "job.json").write_text(json.dumps(job))
    done = subprocess.run(torchrun(str(SUPPORT), str(tmp / "job.json")), env=job_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return tmp, done.stderr


@pytest.mark.parametrize("dtype, tolerance", [("torch.float64", 1e-12), ("torch.float32", 1e-5)])
def test_engines_over_two_processes_equal_one(two_process_job, dtype, tolerance):
    from distributed_support import all_cases

    tmp, _ = two_process_job
    two = torch.load(tmp / "engines.pt", weights_only=False)
    assert two["world_size"] == 2
    one = {k: v for k, v in all_cases().items() if k[0] == dtype}
    assert len(one) == 6
    for key, ref in one.items():
        got = two["results"][key]
        assert set(got) == set(ref)
        assert torch.linalg.vector_norm(ref["grad_images"]) > 0 and ref["grad_alpha"] != 0
        for name in ref:
            assert rel(got[name], ref[name]) <= tolerance, (key, name, rel(got[name], ref[name]))


def test_traced_steps_over_two_processes_equal_one_process_eager(two_process_job):
    """The compiled path's graphs (traced: what TorchInductor compiles and CUDA graphs capture)
    over two processes: the shard graphs, summed over the ranks outside the graph, give the
    one-process eager numbers (float64 1e-12, float32 1e-5)."""
    from distributed_support import TRACED, all_cases

    tmp, _ = two_process_job
    traced = torch.load(tmp / "engines.pt", weights_only=False)["traced"]
    one = all_cases()
    assert len(traced) == len(TRACED)
    for key, got in traced.items():
        tolerance = 1e-12 if key[0] == "torch.float64" else 1e-5
        for name, ref in one[key].items():
            assert rel(got[name], ref) <= tolerance, (key, name, rel(got[name], ref))


def assert_same_result(got: SyntheticSet, ref: SyntheticSet, tolerance: float = 1e-5) -> None:
    assert got.iteration == ref.iteration
    assert rel(got.images, ref.images) <= tolerance
    assert rel(got.lr, ref.lr) <= tolerance
    assert (got.soft_labels is None) == (ref.soft_labels is None) and (got.label_logits is None) == (ref.label_logits is None)
    if ref.soft_labels is not None:
        assert rel(got.soft_labels, ref.soft_labels) <= tolerance
    if ref.label_logits is not None:
        assert rel(got.label_logits, ref.label_logits) <= tolerance


@pytest.mark.parametrize("engine, labels", ENGINE_CASES)
def test_distillation_over_two_processes_equals_one(toy, two_process_job, tmp_path, engine, labels):
    tmp, stderr = two_process_job
    ref = distill(case_settings(toy, tmp_path, engine, labels))
    got = SyntheticSet.load(tmp / f"{engine}-{labels}" / "syn.h5")
    assert_same_result(got, ref)
    assert not torch.equal(ref.images, distill(case_settings(toy, tmp_path / "k1", engine, labels, iterations=1)).images)
    assert got.settings["world_size"] == 2 and ref.settings["world_size"] == 1
    assert "one run over 2 processes (gloo" in stderr


def test_checkpoints_resume_with_another_number_of_processes(toy, two_process_job, tmp_path):
    tmp, stderr = two_process_job
    ref = distill(case_settings(toy, tmp_path, "exact", "none"))
    assert f"resuming from {tmp / 'one-then-two' / 'syn.h5.ckpt'} at iteration 2" in stderr
    assert_same_result(SyntheticSet.load(tmp / "one-then-two" / "syn.h5"), ref)  # 1 process, then 2
    two_then_one = distill(case_settings(toy, tmp / "two-then-one", "exact", "none"))  # 2 processes, then 1
    assert two_then_one.settings["world_size"] == 1
    assert_same_result(two_then_one, ref)


def _workers(parent: int) -> list[int]:
    """The processes torchrun started (children of its pid)."""
    children = Path(f"/proc/{parent}/task/{parent}/children")
    return [int(p) for p in children.read_text().split()] if children.exists() else []


def test_a_killed_rank_ends_the_job_with_an_error_and_the_rerun_completes(toy, tmp_path):
    s = case_settings(toy, tmp_path, "tesla", "none", iterations=400, checkpoint_every=2, syn_steps=2)
    command = torchrun("-m", "tesla", "distill", *_flags(s))
    job = subprocess.Popen(command, env={**job_env(), "TESLA_DIST_TIMEOUT": "60"}, stderr=subprocess.PIPE, text=True)
    ckpt = Path(f"{s.out}.ckpt")
    deadline = time.monotonic() + 300
    while not ckpt.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ckpt.exists() and job.poll() is None, "the job did not reach its first checkpoint"
    with pytest.raises(TeslaError, match="lock"):  # rank 0 holds the output's lock for the job
        distill(s)
    workers = _workers(job.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    killed = time.monotonic()
    try:
        _, err = job.communicate(timeout=120)
    finally:
        job.kill()
    assert job.returncode != 0 and time.monotonic() - killed < 120
    assert "FAILED" in err or "process" in err  # torchrun's report of the failed worker
    assert not Path(s.out).exists()
    saved = torch.load(ckpt, weights_only=False)["iteration"]
    rerun = subprocess.run(
        torchrun("-m", "tesla", "distill", *_flags(s, iterations=saved + 2)), env=job_env(), capture_output=True,
        text=True, timeout=600,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"at iteration {saved}" in rerun.stderr
    assert SyntheticSet.load(s.out).iteration == saved + 2


def test_a_job_whose_output_is_locked_by_another_run_stops_on_every_rank(toy, tmp_path):
    from tesla.locks import acquire

    s = case_settings(toy, tmp_path, "exact", "none")
    with acquire(f"{s.out}.lock", stage="test", protects="the output"):
        done = subprocess.run(torchrun("-m", "tesla", "distill", *_flags(s)), env={**job_env(), "TESLA_DIST_TIMEOUT": "60"},
                              capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "process 1 of 2: process 0 could not start the run" in done.stderr, done.stderr[-3000:]
    assert "lock" in done.stderr and not Path(s.out).exists()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_tasks_started_as_srun_does_join_by_slurms_environment_and_a_survivor_stops_with_a_clear_error(toy, tmp_path):
    """Two tasks started with the variables srun gives them (no torchrun to tear the job down):
    they meet at the first host of SLURM_JOB_NODELIST; when one is killed, the other's next
    collective fails and it exits non-zero saying what happened and how to resume."""
    s = case_settings(toy, tmp_path, "exact", "none", iterations=400, checkpoint_every=2, syn_steps=2)
    slurm = {"SLURM_STEP_NUM_TASKS": "2", "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": "7",
             "MASTER_PORT": str(_free_port()), "TESLA_DIST_TIMEOUT": "30"}
    tasks = [
        subprocess.Popen([sys.executable, "-m", "tesla", "distill", *_flags(s)], stderr=subprocess.PIPE, text=True,
                         env={**job_env(), **slurm, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)})
        for r in range(2)
    ]
    try:
        ckpt = Path(f"{s.out}.ckpt")
        deadline = time.monotonic() + 300
        while not ckpt.exists() and all(t.poll() is None for t in tasks) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ckpt.exists() and all(t.poll() is None for t in tasks), tasks[0].stderr.read() if tasks[0].poll() else ""
        tasks[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        _, err = tasks[0].communicate(timeout=90)
    finally:
        for t in tasks:
            t.kill()
    assert tasks[0].returncode not in (0, None) and time.monotonic() - killed < 90
    assert "process 0 of 2:" in err and "another process of the job stopped" in err and "resume" in err, err[-2000:]
    assert "Traceback" not in err


def _flags(s, **change) -> list[str]:
    values = {**asdict(s), **change}
    return [
        "--train", values["train"], "--experts", *values["experts"], "--out", values["out"], "--ipc", str(values["ipc"]),
        "--syn-steps", str(values["syn_steps"]), "--expert-epochs", str(values["expert_epochs"]),
        "--max-start-epoch", str(values["max_start_epoch"]), "--batch-syn", str(values["batch_syn"]),
        "--iterations", str(values["iterations"]), "--checkpoint-every", str(values["checkpoint_every"]),
        "--lr-img", str(values["lr_img"]), "--engine", values["engine"], "--device", "cpu", "--no-progress",
    ]


# ---------------------------------------------------------------------------------------
# the launcher's environment, the shards, the refusals (one process)
# ---------------------------------------------------------------------------------------
def test_first_host_of_a_slurm_host_list():
    assert first_host("gpu[07-09,12],cpu3") == "gpu07"
    assert first_host("node5") == "node5"
    assert first_host("a-b[1,3]") == "a-b1"


def test_the_launch_is_read_from_torchrun_or_srun():
    assert detect_launch({}) is None
    assert detect_launch({"RANK": "0", "WORLD_SIZE": "1"}) is None
    t = detect_launch({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "123"})
    assert (t.rank, t.world_size, t.local_rank, t.launcher, t.init_method) == (1, 4, 1, "torchrun", "env://")
    slurm = {"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "42",
             "SLURM_JOB_NODELIST": "gpu[07-08]"}
    s = detect_launch(slurm)
    assert (s.rank, s.world_size, s.local_rank, s.master_addr, s.master_port) == (3, 8, 1, "gpu07", 29542)
    assert s.init_method == "tcp://gpu07:29542"
    assert detect_launch({**slurm, "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.1"}).master_addr == "10.0.0.1"
    assert detect_launch({**slurm, "SLURM_STEP_NUM_TASKS": "1"}) is None  # one task: no job to join
    assert detect_launch({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}) is None  # the batch script, not an srun step


def test_a_gpu_named_by_index_is_refused_over_several_processes():
    from tesla.distributed import local_device

    with pytest.raises(TeslaError, match="each takes the GPU of its local rank"):
        local_device(torch.device("cuda", 0), Ranks(rank=1, world_size=2))
    assert local_device(torch.device("cuda", 0), SINGLE) == torch.device("cuda", 0)
    assert local_device(torch.device("cpu"), Ranks(rank=1, world_size=2)) == torch.device("cpu")


def test_shards_cover_the_minibatch_in_order():
    for n in (2, 5, 7):
        for g in (1, 2, 3):
            rows = [Ranks(rank=r, world_size=g).shard(n) for r in range(g)]
            assert [i for sl in rows for i in range(n)[sl]] == list(range(n))
            assert max(len(range(n)[sl]) for sl in rows) - min(len(range(n)[sl]) for sl in rows) <= 1
    assert SINGLE.shard(5) == slice(0, 5) and not SINGLE.distributed and SINGLE.writes


@pytest.mark.parametrize("engine, batch_syn, images", [("unroll", 4, 8), ("exact", 5, 6), ("tesla", 1, 10)])
def test_the_shard_rules_are_one_function_for_the_command_line_and_the_config(engine, batch_syn, images):
    """tesla.sharding decides what G processes cannot do: `tesla distill` raises its first
    problem naming flags, the workflow's config check lists them naming config keys."""
    from tesla.matching import check_shardable
    from tesla.settings import Wording
    from tesla.sharding import row_problems, shard_problems

    [first, *_] = shard_problems(engine, batch_syn, images, 2, Wording().name)
    with pytest.raises(TeslaError) as refused:
        check_shardable(engine, batch_syn, images, Ranks(rank=0, world_size=2))
    assert str(refused.value) == f"a run over 2 processes: {first}"
    check_shardable(engine, batch_syn, images, SINGLE)  # one process: anything goes
    row = {"gpus": 2, "engine": [engine], "batch_syn": batch_syn}
    named = shard_problems(engine, batch_syn, images, 2, lambda key: f"datasets.d.distill.1.{key}")
    assert row_problems(row, "datasets.d.distill.1", images, "convnet", "datasets.d.model") == [
        f"config key datasets.d.distill.1.gpus: a run over 2 processes: {p}" for p in named]
    assert row_problems({**row, "gpus": 1}, "datasets.d.distill.1", images, "resnet18_bn", "datasets.d.model") == []


def test_what_two_processes_cannot_do_is_refused_before_any_work(toy, tmp_path):
    from tesla.distill import build_setup
    from tesla.matching import check_shardable

    two = Ranks(rank=0, world_size=2)
    with pytest.raises(TeslaError, match="engine unroll runs in one process"):
        build_setup(settings(toy, tmp_path, engine="unroll"), two)
    with pytest.raises(TeslaError, match="minibatches of 1 images .* fewer than the processes"):
        build_setup(settings(toy, tmp_path, batch_syn=1), two)
    with pytest.raises(TeslaError, match="minibatches of 1 images"):  # 6 images in minibatches of 5: 5 and 1
        check_shardable("exact", 5, 6, two)
    # before the experts are opened: a missing expert file is not what is reported
    for change, message in ((dict(engine="unroll"), "engine unroll runs in one process; use --engine exact or tesla"),
                            (dict(batch_syn=5), r"every minibatch .* minibatches of 1 images \(--batch-syn 5, 6 images\)")):
        with pytest.raises(TeslaError, match=f"^a run over 2 processes: {message}"):
            build_setup(settings(toy, tmp_path, experts=[str(tmp_path / "missing.h5")], **change), two)
    from tesla.distill_setup import _check_per_sample
    from tesla.models import build_model

    bn = build_model("convnet_d1", channels=3, num_classes=3, resolution=8, width=4, norm="batchnorm")
    with pytest.raises(TeslaError, match="uses batch norm"):
        _check_per_sample(bn, {"name": "convnet_d1"}, two)
    _check_per_sample(bn, {"name": "convnet_d1"}, SINGLE)  # one process: batch norm as before
    _check_per_sample(build_model("convnet_d1", channels=3, num_classes=3, resolution=8, width=4), {}, two)


@pytest.mark.slow
def test_the_multi_gpu_benchmark_script_runs_at_toy_size_and_counts_the_formulas_bytes(tmp_path):
    """bench/gpu_distributed.sh (G = 1, 2 on the CPU): its tables, and the all-reduced floats
    counted in the two-process run equal bench_distributed.py's formula."""
    env = {**job_env(), "TOY": "1", "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_distributed.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "exit status 0 (G = 1)" in done.stdout and "exit status 0 (G = 2)" in done.stdout
    two = (tmp_path / "distributed_g2.md").read_text()
    formula, counted = re.search(r"Formula: ([\d,]+) floats all-reduced per iteration; counted: ([\d,]+)\.", two).groups()
    assert formula == counted and int(formula.replace(",", "")) > 0
    speedup = (tmp_path / "distributed_speedup.md").read_text()
    assert re.search(r"^\| 1 \| [\d.]+ \| 1\.00 \|$", speedup, re.M) and re.search(r"^\| 2 \| [\d.]+ \| [\d.]+ \|$", speedup, re.M)

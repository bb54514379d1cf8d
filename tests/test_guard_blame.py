"""The divergence guard blames the right setting, on the demo (the embedded digits, the
demo config's IPC 1 settings and its five experts).

A healthy demo run's images grow: 2.3 x their initial RMS after 100 iterations, 2.9 x after
200. A loss breach used to be blamed on lr_img once the images had doubled since the start,
so a stop caused by syn_steps or lr_teacher was blamed on lr_img, and lowering lr_img did
not help: resuming with --syn-steps 300 blamed lr_img at 100 and again at 10, and
--lr-teacher 0.1 was blamed on lr_img at 100 and 10 before lr_teacher was named. The blame
now rests on the run's own evidence (tesla/guard.py): how alpha and the images moved since
the run's last state with a healthy loss.

The module prepares the demo, trains its experts and runs 100 healthy iterations once;
each test then resumes from that checkpoint, or starts afresh, for a few iterations.
Time budget: about 20 s on 2 cores.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tesla.cli import main
from tesla.distill import DistillSettings, Diverged, distill

pytestmark = pytest.mark.usefixtures("one_thread")

EXPERTS = 5
HEALTHY = 100  # iterations of the healthy history


@pytest.fixture(scope="module")
def demo(tmp_path_factory, one_thread) -> tuple[Path, list[str], Path]:
    """(folder, the experts, the checkpoint of HEALTHY iterations with the demo's settings)."""
    root = tmp_path_factory.mktemp("guard-demo")
    assert main(["prepare", "demo", "--out-dir", str(root / "data")]) == 0
    experts = [str(root / f"expert_{k}.h5") for k in range(EXPERTS)]
    assert main([
        "experts", "--train", str(root / "data" / "train.h5"), "--test", str(root / "data" / "test.h5"),
        "--out", *experts, "--seed", *map(str, range(EXPERTS)), "--model", "convnet_d1", "--epochs", "15",
        "--lr", "0.03", "--batch-size", "128", "--keep-snapshots", "6", "--device", "cpu",
    ]) == 0
    healthy = _settings(root, experts, root / "healthy", iterations=HEALTHY)
    distill(healthy)
    return root, experts, Path(healthy.checkpoint)


def _settings(root: Path, experts: list[str], run: Path, **kw) -> DistillSettings:
    """The demo config's IPC 1 distillation (config/config.yaml), its checkpoint kept in ``run``."""
    base = dict(
        train=str(root / "data" / "train.h5"), experts=experts, out=str(run / "syn.h5"), ipc=1, syn_steps=10,
        expert_epochs=2, max_start_epoch=4, lr_img=100.0, lr_lr=1e-5, lr_teacher=0.01, iterations=200,
        checkpoint_every=50, checkpoint=str(run / "checkpoint.pt"), device="cpu", progress=False,
    )
    return DistillSettings(**{**base, **kw})


def _resumed(demo, tmp_path: Path, **kw) -> DistillSettings:
    """Settings that resume the healthy history (a copy of its checkpoint)."""
    root, experts, checkpoint = demo
    s = _settings(root, experts, tmp_path, **kw)
    shutil.copy(checkpoint, s.checkpoint)
    return s


def _stop(s: DistillSettings) -> str:
    with pytest.raises(Diverged) as err:
        distill(s)
    return str(err.value)


@pytest.mark.parametrize("lr_img", [100.0, 10.0])
def test_more_student_steps_on_resume_are_blamed_whatever_lr_img(demo, tmp_path, lr_img):
    # the loss of the resumed state with 300 steps: 5.6 (10 steps: 0.4), the state itself as
    # healthy as before; max_loss 3 stops it at once (with the default 10 it stops later)
    s = _resumed(demo, tmp_path, syn_steps=300, iterations=HEALTHY + 1, max_loss=3.0, lr_img=lr_img)
    msg = _stop(s)
    assert f"iteration {HEALTHY + 1}: the matching loss" in msg, msg
    assert f"largest image RMS 2.4" in msg and "(2.28 x its initial value" in msg, msg  # grown healthily
    assert f"since iteration {HEALTHY - 1}, the last state with a loss of at most 1, alpha changed 1 x and the largest image RMS 1 x" in msg, msg
    assert "Most likely cause: --lr-teacher (now 0.01) or --syn-steps (now 300) is too large" in msg, msg
    assert f"the last good state, iteration {HEALTHY}, stays in {s.checkpoint}: the same command with a changed --syn-steps or --max-loss resumes from it" in msg, msg
    # the advice is true: the demo's 10 steps resume from that state and go on
    assert distill(_settings(*demo[:2], tmp_path, iterations=HEALTHY + 2, lr_img=lr_img)).iteration == HEALTHY + 2


@pytest.mark.parametrize("lr_img", [100.0, 10.0])
def test_a_too_large_lr_teacher_is_blamed_whatever_lr_img(demo, tmp_path, lr_img):
    # alpha_0 = 0.1: the first loss, of the initial images, is 5.9 (the demo's 0.01: 0.83);
    # its large gradient moves the images 7 to 70 x in two iterations, then the loss breaks
    root, experts, _ = demo
    msg = _stop(_settings(root, experts, tmp_path, lr_teacher=0.1, lr_img=lr_img, iterations=5))
    assert "iteration 3: the matching loss" in msg, msg
    assert "no state of this run had a loss of at most 1" in msg, msg
    assert "Most likely cause: --lr-teacher (now 0.1) or --syn-steps (now 10) is too large" in msg, msg


def test_a_too_large_lr_img_is_still_blamed(demo, tmp_path):
    # lr_img 1e4 on resume: the images grow 3.6 x in two iterations from a healthy state
    # and the loss follows (the image limit raised, so that the loss is what stops it)
    s = _resumed(demo, tmp_path, lr_img=1e4, iterations=HEALTHY + 10, max_loss=2.0, max_image_growth=1e6)
    msg = _stop(s)
    assert f"iteration {HEALTHY + 2}: the matching loss" in msg, msg
    assert f"since iteration {HEALTHY}, the last state with a loss of at most 1" in msg, msg
    assert "Most likely cause: --lr-img (now 10000) is too large; lower it" in msg, msg

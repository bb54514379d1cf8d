"""The training loop: losses, minibatch order, SGD with momentum / weight decay / lr decay, guards."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tesla.errors import TeslaError
from tesla.models import build_model
from tesla.parameters import flatten_params
from tesla.devices import pick_device
from tesla.losses import soft_cross_entropy, training_loss
from tesla.training import (
    EpochStats,
    accuracy,
    epoch_lr,
    make_optimizer,
    minibatches,
    train,
)


def toy_data(n: int = 96, k: int = 3, r: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Separable images: class c has a bright band in rows c*r/k .. (c+1)*r/k, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % k
    x = 0.3 * torch.randn(n, 1, r, r, generator=g)
    for c in range(k):
        x[y == c, :, c * r // k : (c + 1) * r // k] += 2.0
    return x, y


def small_net(k: int = 3, r: int = 8, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("convnet_d1", channels=1, num_classes=k, resolution=r, width=8)


def test_soft_cross_entropy_matches_torch_and_hard_labels():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, generator=g)
    probs = torch.softmax(torch.randn(5, 4, generator=g), dim=1)
    assert torch.allclose(soft_cross_entropy(logits, probs), F.cross_entropy(logits, probs), atol=1e-6)
    y = torch.tensor([0, 3, 1, 2, 2])
    one_hot = F.one_hot(y, 4).float()
    assert torch.allclose(soft_cross_entropy(logits, one_hot), F.cross_entropy(logits, y), atol=1e-6)
    assert torch.allclose(training_loss(logits, one_hot), training_loss(logits, y), atol=1e-6)


def test_minibatches_are_a_reproducible_permutation():
    batches = minibatches(10, 4, torch.Generator().manual_seed(3))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(torch.cat(batches).tolist()) == list(range(10))
    again = minibatches(10, 4, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    other = torch.cat(minibatches(10, 4, torch.Generator().manual_seed(4)))
    assert not torch.equal(torch.cat(batches), other)


def test_epoch_lr_decays_at_the_given_epochs():
    assert [epoch_lr(1.0, e, (2,)) for e in range(4)] == [1.0, 1.0, pytest.approx(0.1), pytest.approx(0.1)]
    assert epoch_lr(0.5, 7, (2, 5)) == pytest.approx(0.005)


def test_training_learns_a_separable_problem():
    x, y = toy_data()
    model = small_net()
    before = accuracy(model, x, y)
    history = train(model, x, y, epochs=15, lr=0.05, batch_size=32, generator=torch.Generator().manual_seed(0))
    assert len(history) == 15 and all(isinstance(h, EpochStats) for h in history)
    assert [h.epoch for h in history] == list(range(1, 16))
    assert history[-1].loss < 0.5 * history[0].loss
    assert accuracy(model, x, y) >= 0.95 > before


def test_one_step_is_sgd_with_momentum_and_weight_decay():
    """Two full-batch epochs equal theta <- theta - lr (b), b <- mu b + g + wd theta, computed by hand."""
    x, y = toy_data(n=12)
    model = small_net()
    ref = copy.deepcopy(model)
    lr, mu, wd = 0.1, 0.9, 5e-4
    train(model, x, y, epochs=2, lr=lr, momentum=mu, weight_decay=wd, batch_size=64, generator=torch.Generator())
    params = [p.detach().clone() for p in ref.parameters()]
    bufs = [torch.zeros_like(p) for p in params]
    for step in range(2):
        for p, q in zip(ref.parameters(), params):
            p.data.copy_(q)
        ref.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        for i, p in enumerate(ref.parameters()):
            bufs[i] = p.grad + wd * params[i] if step == 0 else mu * bufs[i] + p.grad + wd * params[i]
            params[i] = params[i] - lr * bufs[i]
    got = flatten_params(model)
    want = torch.cat([p.reshape(-1) for p in params])
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)


def test_lr_decay_is_applied_and_reported():
    x, y = toy_data(n=12)
    history = train(small_net(), x, y, epochs=4, lr=0.02, lr_decay_epochs=(2,), generator=torch.Generator())
    assert [h.lr for h in history] == [0.02, 0.02, pytest.approx(0.002), pytest.approx(0.002)]


def test_resuming_at_start_epoch_continues_exactly():
    x, y = toy_data(n=40)
    calls = []

    def dsa(xb, generator):
        calls.append(len(xb))
        flip = torch.rand(len(xb), generator=generator) < 0.5
        return torch.where(flip[:, None, None, None], xb.flip(-1), xb), flip

    full = small_net()
    opt_full = torch.optim.SGD(full.parameters(), lr=0.05, momentum=0.9)
    train(full, x, y, epochs=3, lr=0.05, momentum=0.9, batch_size=16, dsa=dsa, generator=torch.Generator().manual_seed(1), optimizer=opt_full)
    assert calls == [16, 16, 8] * 3

    part = small_net()
    opt = torch.optim.SGD(part.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    train(part, x, y, epochs=2, lr=0.05, momentum=0.9, batch_size=16, dsa=dsa, generator=g, optimizer=opt)
    saved = (copy.deepcopy(part.state_dict()), copy.deepcopy(opt.state_dict()), g.get_state())
    resumed = small_net(seed=5)
    opt2 = torch.optim.SGD(resumed.parameters(), lr=0.05, momentum=0.9)
    resumed.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    g2 = torch.Generator()
    g2.set_state(saved[2])
    history = train(resumed, x, y, epochs=3, lr=0.05, momentum=0.9, batch_size=16, dsa=dsa, generator=g2, optimizer=opt2, start_epoch=2)
    assert [h.epoch for h in history] == [3]
    assert torch.equal(flatten_params(resumed), flatten_params(full))


def test_soft_one_hot_labels_train_like_hard_labels():
    x, y = toy_data(n=24)
    a, b = small_net(), small_net()
    train(a, x, y, epochs=2, lr=0.05, batch_size=8, generator=torch.Generator().manual_seed(0))
    history = train(b, x, F.one_hot(y, 3).float(), epochs=2, lr=0.05, batch_size=8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(flatten_params(a), flatten_params(b), atol=1e-6)
    assert 0.0 <= history[-1].accuracy <= 1.0


def test_non_finite_loss_raises_naming_epoch_and_lr():
    x, y = toy_data(n=12)
    x[3] = float("nan")
    with pytest.raises(TeslaError, match=r"epoch 1 at learning rate 0\.03"):
        train(small_net(), x, y, epochs=2, lr=0.03, generator=torch.Generator())


def test_on_epoch_end_sees_every_epoch_and_can_stop_training():
    x, y = toy_data(n=12)
    seen = []

    def stop_at_two(stats):
        seen.append(stats.epoch)
        if stats.epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(small_net(), x, y, epochs=5, lr=0.01, generator=torch.Generator(), on_epoch_end=stop_at_two)
    assert seen == [1, 2]


def test_accuracy_is_eval_mode_and_restores_the_mode():
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.99), nn.Linear(4, 2))
    with torch.no_grad():
        model[2].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
        model[2].bias.zero_()
    x = torch.tensor([[[[2.0, 0.0], [0.0, 0.0]]], [[[0.0, 2.0], [0.0, 0.0]]], [[[0.0, 3.0], [0.0, 0.0]]]])
    y = torch.tensor([0, 1, 0])
    model.train()
    assert accuracy(model, x, y, batch_size=2) == pytest.approx(2 / 3)  # dropout off in eval mode
    assert model.training
    assert accuracy(model, x, F.one_hot(y, 2).float()) == pytest.approx(2 / 3)


def test_bad_settings_and_labels_are_clear_errors():
    x, y = toy_data(n=12)
    g = torch.Generator()
    with pytest.raises(TeslaError, match="learning rate"):
        train(small_net(), x, y, epochs=1, lr=0.0, generator=g)
    with pytest.raises(TeslaError, match="batch size"):
        train(small_net(), x, y, epochs=1, lr=0.1, batch_size=0, generator=g)
    with pytest.raises(TeslaError, match="12 images but 11 labels"):
        train(small_net(), x, y[:11], epochs=1, lr=0.1, generator=g)
    with pytest.raises(TeslaError, match="int64"):
        train(small_net(), x, y.int(), epochs=1, lr=0.1, generator=g)


def test_pick_device():
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(TeslaError, match="not a device"):
        pick_device("gpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(TeslaError, match="CUDA is not available"):
            pick_device("cuda")


def test_the_config_schema_takes_the_device_names_pick_device_knows():
    """The config's ``device`` pattern and the names ``--device`` takes are one declaration:
    every name it lets through is a device pick_device understands (available or not), and a
    name it refuses, pick_device refuses too, listing the names."""
    import re

    from tesla.devices import DEVICE_NAMES, DEVICE_PATTERN

    for name in ("auto", "cpu", "cuda", "cuda:0", "cuda:12"):
        assert re.match(DEVICE_PATTERN, name), name
        try:
            pick_device(name)
        except TeslaError as e:  # a device this machine lacks, not an unknown name
            assert "not available" in str(e) or "CUDA device(s)" in str(e), (name, e)
    for name in ("gpu", "cuda:", "cuda:x", "CPU", "xla"):
        assert not re.match(DEVICE_PATTERN, name), name
        with pytest.raises(TeslaError, match=re.escape(DEVICE_NAMES)):
            pick_device(name)
    # MPS has no float64, which every stage keeps on its device (epoch tallies, the matching's
    # one transfer, the ZCA covariance): refused by name on any machine, with or without MPS
    assert not re.match(DEVICE_PATTERN, "mps") and "mps" not in DEVICE_NAMES
    with pytest.raises(TeslaError, match=r"--device mps: .*float64.*use --device cpu"):
        pick_device("mps")


def test_uint8_images_normalised_per_batch_train_like_float_images():
    from tesla.data import normalize
    from tesla.input_space import InputSpace, Normalization

    g = torch.Generator().manual_seed(0)
    u = torch.randint(0, 256, (20, 8, 8, 1), dtype=torch.uint8, generator=g)
    y = torch.arange(20) % 3
    mean, std = [0.4], [0.3]
    to_input = InputSpace(Normalization("split", tuple(mean), tuple(std))).minibatch_transform("cpu")
    assert torch.equal(to_input(u), normalize(u, mean, std))
    assert to_input(u).is_contiguous()
    a, b = small_net(), small_net()
    train(a, normalize(u, mean, std), y, epochs=2, lr=0.05, batch_size=8, generator=torch.Generator().manual_seed(1))
    train(b, u, y, epochs=2, lr=0.05, batch_size=8, generator=torch.Generator().manual_seed(1), input_transform=to_input)
    assert torch.equal(flatten_params(a), flatten_params(b))
    assert accuracy(a, normalize(u, mean, std), y) == accuracy(b, u, y, input_transform=to_input)


# --------------------------------------------------------------------------------------
# the loop is today's loop; several networks per process; precision and layout
# --------------------------------------------------------------------------------------
from tesla.augment import DSA  # noqa: E402
from tesla.parameters import flatten_buffers  # noqa: E402
from tesla.precision import Numerics  # noqa: E402
from tesla.group_modes import AUTO_GROUP_MODE, resolve_group_mode  # noqa: E402
from tesla.group_training import train_group  # noqa: E402
from tesla.training import EndTraining, GroupMember  # noqa: E402


def reference_loop(model, x, y, *, epochs, lr, momentum, weight_decay, batch_size, dsa, generator, decay_epoch):
    """The training loop written out independently: a permutation per epoch, chunks of it,
    DSA with the run's generator, cross-entropy, torch's SGD, lr x0.1 from decay_epoch."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    for epoch in range(epochs):
        for group in opt.param_groups:
            group["lr"] = lr * (0.1 if epoch >= decay_epoch else 1.0)
        perm = torch.randperm(len(x), generator=generator)
        for s in range(0, len(x), batch_size):
            idx = perm[s : s + batch_size]
            xb, _ = dsa(x[idx], generator)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


def test_float32_training_is_the_reference_loop_bitwise():
    """With the default arithmetic (float32, contiguous) a run is exactly the plain loop:
    the options of this module change nothing unless asked for."""
    x, y = toy_data(n=40)
    a, b = small_net(seed=2), small_net(seed=2)
    settings = dict(epochs=3, lr=0.05, momentum=0.9, weight_decay=5e-4, batch_size=16)
    train(a, x, y, **settings, dsa=DSA(), generator=torch.Generator().manual_seed(7), lr_decay_epochs=(2,))
    reference_loop(b, x, y, **settings, dsa=DSA(), generator=torch.Generator().manual_seed(7), decay_epoch=2)
    assert torch.equal(flatten_params(a), flatten_params(b))


def group_nets(k: int, norm: str = "instancenorm") -> list[nn.Module]:
    nets = []
    for seed in range(k):
        torch.manual_seed(seed)
        nets.append(build_model("convnet_d1", channels=1, num_classes=3, resolution=8, width=8, norm=norm))
    return nets


GROUP_SETTINGS = dict(epochs=4, lr=0.05, momentum=0.9, weight_decay=5e-4, batch_size=16, lr_decay_epochs=(2,),
                      reset_momentum_at_decay=True)


class Snapshots:
    """An on_epoch_end callback that records theta (and buffers) after every epoch."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.thetas, self.buffers = model, [], []

    def __call__(self, stats) -> None:
        self.thetas.append(flatten_params(self.model))
        self.buffers.append(flatten_buffers(self.model))


def alone(net: nn.Module, x, y, seed: int, **settings) -> Snapshots:
    net = copy.deepcopy(net)
    snaps = Snapshots(net)
    train(net, x, y, dsa=DSA(), generator=torch.Generator().manual_seed(seed), on_epoch_end=snaps, **{**GROUP_SETTINGS, **settings})
    return snaps


@pytest.mark.parametrize("mode", ["sequential", "streams", "vmap"])
@pytest.mark.parametrize("norm", ["instancenorm", "batchnorm"])
def test_network_k_of_a_group_equals_network_k_trained_alone(mode, norm):
    """Own seed, order and augmentation draws: sequential and streams (interleaved, on the
    CPU) bitwise, vmap within float32 round-off, every epoch, batch-norm statistics included."""
    x, y = toy_data(n=40)
    nets = group_nets(3, norm)
    want = [alone(net, x, y, seed=10 + k) for k, net in enumerate(nets)]
    nets = [copy.deepcopy(n) for n in nets]
    snaps = [Snapshots(n) for n in nets]
    members = [GroupMember(n, x, y, torch.Generator().manual_seed(10 + k), on_epoch_end=s, name=f"net {k}")
               for k, (n, s) in enumerate(zip(nets, snaps))]
    histories = train_group(members, mode=mode, dsa=DSA(), **GROUP_SETTINGS)
    assert [[h.epoch for h in hist] for hist in histories] == [[1, 2, 3, 4]] * 3
    for got, ref in zip(snaps, want):
        for theta, theta_ref, buf, buf_ref in zip(got.thetas, ref.thetas, got.buffers, ref.buffers):
            if mode == "vmap":
                torch.testing.assert_close(theta, theta_ref, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(buf, buf_ref, rtol=1e-5, atol=1e-5)
            else:
                assert torch.equal(theta, theta_ref) and torch.equal(buf, buf_ref)
    assert not torch.allclose(snaps[0].thetas[-1], snaps[1].thetas[-1])  # distinct networks


def test_the_sequential_mode_is_the_one_network_path_with_the_groups_recipe(monkeypatch):
    """train and the sequential group mode train each network through one function,
    training.train_alone, with the same Recipe: one protocol, spelt out once."""
    import tesla.training

    seen, real = [], tesla.training.train_alone

    def spy(member, recipe, *args, **kw):
        seen.append((member.name, recipe))
        return real(member, recipe, *args, **kw)

    monkeypatch.setattr(tesla.training, "train_alone", spy)
    x, y = toy_data(n=16)
    nets = group_nets(3)
    train(nets[0], x, y, generator=torch.Generator().manual_seed(0), desc="alone", **GROUP_SETTINGS)
    # the group hands over its Recipe, not train's keyword arguments spelt out again
    monkeypatch.setattr(tesla.training, "train", lambda *a, **k: pytest.fail("the sequential mode went through train"))
    train_group([GroupMember(n, x, y, torch.Generator().manual_seed(k), name=f"net {k}") for k, n in enumerate(nets[1:])],
                mode="sequential", **GROUP_SETTINGS)
    assert [name for name, _ in seen] == ["alone", "net 0", "net 1"]
    assert seen[0][1] == seen[1][1] == seen[2][1] == tesla.training.make_recipe(lr_decay=0.1, **GROUP_SETTINGS)


@pytest.mark.parametrize("mode", ["streams", "vmap"])
def test_a_network_resumed_later_joins_the_group_and_one_that_ends_leaves_it(mode):
    """Network 1 resumes at epoch 2 (state saved after two epochs alone); network 2 ends
    after its second epoch (EndTraining); all still compute what they compute alone."""
    x, y = toy_data(n=40)
    nets = group_nets(3)
    want = [alone(net, x, y, seed=20 + k) for k, net in enumerate(nets)]
    # network 1: two epochs alone, then its state (model, optimizer, generator) resumes in the group
    first = copy.deepcopy(nets[1])
    opt = make_optimizer(first, GROUP_SETTINGS["lr"], GROUP_SETTINGS["momentum"], GROUP_SETTINGS["weight_decay"])
    g1 = torch.Generator().manual_seed(21)
    train(first, x, y, dsa=DSA(), generator=g1, optimizer=opt, **{**GROUP_SETTINGS, "epochs": 2})
    nets = [copy.deepcopy(nets[0]), first, copy.deepcopy(nets[2])]
    snaps = [Snapshots(n) for n in nets]

    def end_after_two(stats):
        snaps[2](stats)
        if stats.epoch == 2:
            raise EndTraining

    members = [
        GroupMember(nets[0], x, y, torch.Generator().manual_seed(20), on_epoch_end=snaps[0]),
        GroupMember(nets[1], x, y, g1, optimizer=opt, start_epoch=2, on_epoch_end=snaps[1]),
        GroupMember(nets[2], x, y, torch.Generator().manual_seed(22), on_epoch_end=end_after_two),
    ]
    histories = train_group(members, mode=mode, dsa=DSA(), **GROUP_SETTINGS)
    assert [[h.epoch for h in hist] for hist in histories] == [[1, 2, 3, 4], [3, 4], [1, 2]]
    close = (lambda a, b: torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)) if mode == "vmap" else \
        (lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=0))
    for got, ref in zip(snaps[0].thetas, want[0].thetas):
        close(got, ref)
    for got, ref in zip(snaps[1].thetas, want[1].thetas[2:]):
        close(got, ref)
    for got, ref in zip(snaps[2].thetas, want[2].thetas[:2]):
        close(got, ref)


def sgd_by_hand(model, x, y, lr, mu, wd, epochs, decay_epoch, restart):
    """Full-batch SGD with momentum written out: b <- mu b + g + wd theta (b <- g + wd theta
    at the first step, and at the decay epoch when restarting), theta <- theta - lr_e b."""
    params = [p.detach().clone() for p in model.parameters()]
    bufs = None
    for epoch in range(epochs):
        lr_e = lr * (0.1 if epoch >= decay_epoch else 1.0)
        if restart and epoch == decay_epoch:
            bufs = None  # what a newly created optimizer has
        for p, q in zip(model.parameters(), params):
            p.data.copy_(q)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads = [p.grad + wd * q for p, q in zip(model.parameters(), params)]
        bufs = grads if bufs is None else [mu * b + g for b, g in zip(bufs, grads)]
        params = [q - lr_e * b for q, b in zip(params, bufs)]
    return torch.cat([p.reshape(-1) for p in params])


@pytest.mark.parametrize("mode", ["alone", "vmap"])
def test_reset_momentum_at_decay_restarts_the_buffer_at_the_decay_epoch(mode):
    x, y = toy_data(n=12)
    net = small_net()
    lr, mu, wd = 0.1, 0.9, 5e-4
    want = {restart: sgd_by_hand(copy.deepcopy(net), x, y, lr, mu, wd, 4, 2, restart) for restart in (True, False)}
    assert not torch.allclose(want[True], want[False], atol=1e-4)  # the option matters here
    seen = {}
    for restart in (True, False):
        nets = [copy.deepcopy(net) for _ in range(1 if mode == "alone" else 2)]
        opts = [make_optimizer(n, lr, mu, wd) for n in nets]

        def before_decay(stats, opt=opts[0]):
            if stats.epoch == 2:  # the end of epoch 1; the next step is the decay epoch's first
                seen[restart] = [opt.state[p]["momentum_buffer"].clone() for p in opt.param_groups[0]["params"]]

        settings = dict(epochs=4, lr=lr, momentum=mu, weight_decay=wd, batch_size=64, lr_decay_epochs=(2,),
                        reset_momentum_at_decay=restart)
        if mode == "alone":
            train(nets[0], x, y, generator=torch.Generator(), optimizer=opts[0], on_epoch_end=before_decay, **settings)
        else:
            members = [GroupMember(n, x, y, torch.Generator(), optimizer=o, on_epoch_end=before_decay if k == 0 else None)
                       for k, (n, o) in enumerate(zip(nets, opts))]
            train_group(members, mode="vmap", **settings)
        for n in nets:
            torch.testing.assert_close(flatten_params(n), want[restart], rtol=1e-5, atol=1e-6)
    assert all(b.abs().max() > 0 for b in seen[True])  # the buffer existed before the decay and was dropped there


def test_bf16_autocast_runs_on_the_cpu_in_bfloat16():
    x, y = toy_data(n=24)
    dtypes = []
    a = small_net()
    a.features[0].register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    b = copy.deepcopy(a)
    history = train(a, x, y, epochs=2, lr=0.05, batch_size=8, generator=torch.Generator().manual_seed(0),
                    numerics=Numerics(precision="bf16"))
    assert set(dtypes) == {torch.bfloat16} and all(p.dtype == torch.float32 for p in a.parameters())
    assert all(math.isfinite(h.loss) for h in history)
    dtypes.clear()
    train(b, x, y, epochs=2, lr=0.05, batch_size=8, generator=torch.Generator().manual_seed(0))
    assert set(dtypes) == {torch.float32}
    diff = (flatten_params(a) - flatten_params(b)).abs().max()
    assert 0 < diff < 0.05  # the same training, in coarser arithmetic


def test_channels_last_is_the_same_training_in_another_layout():
    x, y = toy_data(n=24)
    a, b = small_net(), small_net()
    train(a, x, y, epochs=2, lr=0.05, batch_size=8, dsa=DSA(), generator=torch.Generator().manual_seed(0),
          numerics=Numerics(channels_last=True))
    train(b, x, y, epochs=2, lr=0.05, batch_size=8, dsa=DSA(), generator=torch.Generator().manual_seed(0))
    assert a.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(flatten_params(a), flatten_params(b), rtol=1e-5, atol=1e-5)


def test_group_modes_resolve_and_bad_groups_are_refused():
    assert resolve_group_mode("auto", "cpu", 3) == AUTO_GROUP_MODE["cpu"] == "sequential"  # measured: vmap is slower there
    assert resolve_group_mode("auto", "cuda", 3) == AUTO_GROUP_MODE["cuda"]
    assert resolve_group_mode("auto", "cpu", 1) == "sequential"
    assert resolve_group_mode("auto", "cuda", 4, Numerics(channels_last=True)) == "sequential"
    with pytest.raises(TeslaError, match="--group-mode 'parallel'"):
        resolve_group_mode("parallel", "cpu", 2)
    with pytest.raises(TeslaError, match="no channels-last layout"):
        resolve_group_mode("vmap", "cpu", 2, Numerics(channels_last=True))
    x, y = toy_data(n=24)
    nets = group_nets(2)
    with pytest.raises(TeslaError, match="the same number of images"):
        train_group([GroupMember(nets[0], x, y, torch.Generator()), GroupMember(nets[1], x[:12], y[:12], torch.Generator())],
                    mode="vmap", epochs=1, lr=0.1)
    other = build_model("convnet_d1", channels=1, num_classes=3, resolution=8, width=4)
    with pytest.raises(TeslaError, match="another architecture"):
        train_group([GroupMember(nets[0], x, y, torch.Generator()), GroupMember(other, x, y, torch.Generator())],
                    mode="vmap", epochs=1, lr=0.1)
    with pytest.raises(TeslaError, match="choose one of"):
        train_group([GroupMember(nets[0], x, y, torch.Generator())], mode="auto", epochs=1, lr=0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA streams and vmap on a GPU need a CUDA device")
@pytest.mark.parametrize("mode", ["streams", "vmap"])
def test_group_modes_on_cuda_equal_training_alone(mode):
    """On a GPU: each network on its own stream (the same kernels as alone; equal up to the
    nondeterminism of cuDNN's backward kernels) or stacked (within float32 round-off)."""
    x, y = toy_data(n=40)
    x, y = x.cuda(), y.cuda()
    nets = [n.cuda() for n in group_nets(3)]
    want = [alone(net, x, y, seed=30 + k).thetas for k, net in enumerate(nets)]
    nets = [copy.deepcopy(n) for n in nets]
    members = [GroupMember(n, x, y, torch.Generator().manual_seed(30 + k)) for k, n in enumerate(nets)]
    train_group(members, mode=mode, dsa=DSA(), numerics=Numerics(), **GROUP_SETTINGS)
    for n, ref in zip(nets, want):
        torch.testing.assert_close(flatten_params(n), ref[-1], rtol=1e-4, atol=1e-5)

"""The training loop: losses, minibatch order, SGD with momentum / weight decay / lr decay, guards."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tesla.errors import TeslaError
from tesla.models import build_model, flatten_params
from tesla.training import (
    EpochStats,
    accuracy,
    epoch_lr,
    minibatches,
    pick_device,
    soft_cross_entropy,
    train,
    training_loss,
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

"""What 16-bit trajectory storage does to the trajectory-matching loss (and its image gradient).

For a float32 expert trajectory, start epoch t and M = ``--expert-epochs``: the student
starts at theta*_t, takes N = ``--syn-steps`` SGD steps (lr alpha = ``--lr-teacher``) on a
synthetic set initialised from random real images (``--ipc`` per class, one DSA sample per
step, the same for every storage type), and

    L = ||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2

is computed with theta*_t and theta*_{t+M} as read back from float32, float16 and bfloat16
storage (``tesla.trajectories.round_to_storage``).  The gradient dL/dX (full unroll,
autograd) is compared too.  Prints one Markdown table row per (t, dtype).

    python bench/trajectory_precision.py --expert expert.h5 --train train.h5 --starts 0 1
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from tesla.augment import DSA
from tesla.data import ImageSplit, normalize
from tesla.parameters import functional_forward, param_layout
from tesla.trajectories import Trajectory, round_to_storage


def matching_loss_and_grad(model, layout, theta_start, theta_target, x_syn, y_syn, aug, dsa, alpha, steps):
    """L = ||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2 and dL/dX by full unroll."""
    x = x_syn.clone().requires_grad_(True)
    theta = theta_start.clone().requires_grad_(True)
    for params in aug[:steps]:
        logits = functional_forward(model, theta, dsa.apply(x, params), layout=layout)
        g = torch.autograd.grad(F.cross_entropy(logits, y_syn), theta, create_graph=True)[0]
        theta = theta - alpha * g
    loss = (theta - theta_target).pow(2).sum() / (theta_start - theta_target).pow(2).sum()
    (grad_x,) = torch.autograd.grad(loss, x)
    return float(loss.detach()), grad_x


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--expert", required=True, help="a float32 tesla-trajectory file")
    p.add_argument("--train", required=True, help="its training split")
    p.add_argument("--starts", type=int, nargs="+", default=[0])
    p.add_argument("--expert-epochs", type=int, default=2)
    p.add_argument("--syn-steps", type=int, default=10)
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--lr-teacher", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    traj = Trajectory.open(args.expert)
    if traj.storage_dtype != "float32":
        raise SystemExit(f"{args.expert}: stored as {traj.storage_dtype}; the reference must be float32")
    split = ImageSplit.open(args.train)
    traj.check_compatible(dataset_fingerprint=split.fingerprint)
    model = traj.build_model()
    model.train()
    layout = param_layout(model)
    g = torch.Generator().manual_seed(args.seed)
    images, labels = split.sample_per_class(args.ipc, g)
    x_syn = normalize(images, traj.input_mean, traj.input_std)
    y_syn = torch.as_tensor(labels)
    dsa = DSA(traj.dsa if traj.dsa != "none" else "none")
    aug = [dsa.sample(x_syn.shape, g) for _ in range(args.syn_steps)]
    print(f"expert {args.expert}: {traj.num_params:,} parameters, {traj.num_snapshots} snapshots; "
          f"N = {args.syn_steps} steps, M = {args.expert_epochs}, alpha = {args.lr_teacher}, "
          f"{len(x_syn)} synthetic images", file=sys.stderr)
    print("| start t | storage | L | relative change of L | relative change of D | cos(dL/dX, float32) | rel. error of dL/dX |")
    print("|---|---|---|---|---|---|---|")
    for t in args.starts:
        start, target = traj.snapshot(t), traj.snapshot(t + args.expert_epochs)
        ref_loss, ref_grad, ref_d = None, None, None
        for dtype in ("float32", "float16", "bfloat16"):
            s, e = round_to_storage(start, dtype), round_to_storage(target, dtype)
            d = float((s - e).pow(2).sum())
            loss, grad = matching_loss_and_grad(model, layout, s, e, x_syn, y_syn, aug, dsa, args.lr_teacher, args.syn_steps)
            if dtype == "float32":
                ref_loss, ref_grad, ref_d = loss, grad, d
            cos = float(F.cosine_similarity(grad.flatten(), ref_grad.flatten(), dim=0))
            rel_g = float((grad - ref_grad).norm() / ref_grad.norm())
            print(f"| {t} | {dtype} | {loss:.6f} | {abs(loss - ref_loss) / ref_loss:.2e} | {abs(d - ref_d) / ref_d:.2e} | "
                  f"{cos:.6f} | {rel_g:.2e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

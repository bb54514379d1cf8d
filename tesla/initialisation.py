"""Initial images among correctly classified real images (DATM's initialisation).

``init: real-correct`` draws each class's ``ipc`` initial images among the real training
images of that class that a chosen expert snapshot theta* classifies correctly::

    X_0^c ~ ipc distinct images of {x in class c : argmax_k f_{theta*}(x)_k = c}

Per class, the images are visited in the order of a random permutation drawn from the run's
generator and classified in chunks until ``ipc`` correct ones are found: reproducible for a
seed, and it classifies only as many images as it needs (all of a class only when few are
correct).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tesla.errors import TeslaError
from tesla.soft_labels import expert_logits


def correct_indices_per_class(
    split,
    ipc: int,
    model: nn.Module,
    snapshot: torch.Tensor,
    input_space,
    generator: torch.Generator,
    chunk: int = 256,
    where: str = "--init real-correct",
) -> np.ndarray:
    """``ipc`` indices per class (class-major, sorted within a class) of images of ``split``
    (a ``tesla.data.ImageSplit``) that ``snapshot`` (the flat parameters of ``model``)
    classifies as their own class, in the input space ``input_space``.

    Raises TeslaError naming the class, its counts and the fix when a class has fewer than
    ``ipc`` correctly classified images."""
    device = snapshot.device
    out = []
    for c in range(split.num_classes):
        offset, n = int(split.class_offsets[c]), split.class_count(c)
        order = torch.randperm(n, generator=generator).numpy() + offset
        chosen: list[int] = []
        for s in range(0, n, chunk):
            block = order[s : s + chunk]
            x = input_space.to_input(split.images_uint8(np.sort(block))).to(device)
            predicted = expert_logits(model, snapshot, x, chunk).argmax(1).cpu().numpy()
            correct = set(np.sort(block)[predicted == c].tolist())
            chosen += [int(i) for i in block if int(i) in correct][: ipc - len(chosen)]
            if len(chosen) == ipc:
                break
        if len(chosen) < ipc:
            raise TeslaError(
                f"{where}: class {split.class_ids[c]} has only {len(chosen)} of its {n} training images classified "
                f"correctly, fewer than --ipc {ipc}; lower --ipc, choose a later or better snapshot (--init-epoch, "
                "--init-expert), or use --init real"
            )
        out.append(np.sort(np.asarray(chosen, dtype=np.int64)))
    return np.concatenate(out)

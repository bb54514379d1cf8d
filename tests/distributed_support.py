"""Run by torchrun in tests/test_distributed.py, one gloo job for all cases (a launch costs
seconds): the matching engines over the ranks on the small functional network of
tests/test_matching.py (rank 0 saves every case's result with ``torch.save``), then the
distillations of a list of settings, one after the other, each writing its own output.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_support.py JOB.json

JOB.json: ``{"engines": OUT.pt, "distill": [DistillSettings fields, ...]}``.
"""

from __future__ import annotations

import json
import sys

import torch

from tesla.distill import DistillSettings, distill

from tesla.augment import DSA
from tesla.distributed import SINGLE, Ranks, join, leave
from tesla.matching import matching_gradients
from tesla.step_compiler import StepCompiler
from test_matching import BATCH_SYN, STRATEGY, make_problem

#: (engine, labels) cases, each in float64 and float32, with DSA
CASES = [(engine, labels) for engine in ("exact", "tesla") for labels in ("hard", "soft", "learned")]
#: the cases also run with traced (compiled-path) student steps: (dtype, engine, labels)
TRACED = [(torch.float64, "exact", "learned"), (torch.float64, "tesla", "hard"), (torch.float32, "exact", "hard")]
SYN_STEPS = 6


def match(problem: dict, engine: str, labels: str, ranks: Ranks, compiler: StepCompiler | None = None) -> dict:
    """One matching call of a case; the gradients as float64 tensors."""
    result = matching_gradients(
        engine, problem["loss_fn"], problem["theta_start"], problem["theta_target"], problem["images"],
        problem["labels"] if labels == "hard" else problem["soft"], 0.1, SYN_STEPS, BATCH_SYN, DSA(STRATEGY),
        torch.Generator().manual_seed(7), compiler=compiler, learn_labels=labels == "learned", ranks=ranks,
    )
    assert result.compile == ("off" if compiler is None else compiler.mode)
    out = {"loss": result.loss, "grad_alpha": result.grad_alpha, "grad_images": result.grad_images.double()}
    if result.grad_labels is not None:
        out["grad_labels"] = result.grad_labels.double()
    return out


def all_cases(ranks: Ranks = SINGLE) -> dict:
    results = {}
    for dtype in (torch.float64, torch.float32):
        problem = make_problem(dtype)
        for engine, labels in CASES:
            results[(str(dtype), engine, labels)] = match(problem, engine, labels, ranks)
    return results


def traced_cases(ranks: Ranks) -> dict:
    """The TRACED cases with traced student steps (the graphs TorchInductor would compile)."""
    return {
        (str(dtype), engine, labels): match(make_problem(dtype), engine, labels, ranks, StepCompiler("trace"))
        for dtype, engine, labels in TRACED
    }


def main(job_file: str) -> None:
    torch.set_num_threads(1)
    job = json.loads(open(job_file).read())
    ranks = join("cpu")
    results, traced = all_cases(ranks), traced_cases(ranks)
    if ranks.writes:
        torch.save({"world_size": ranks.world_size, "results": results, "traced": traced}, job["engines"])
    for fields in job["distill"]:
        distill(DistillSettings(**fields))
    leave(ranks)


if __name__ == "__main__":
    main(sys.argv[1])

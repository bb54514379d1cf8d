"""The config's top-level keys (config/config.yaml), each declared once (:mod:`tesla.settings`);
no torch at import (the workflow reads them while it builds the job graph).

From the declarations come their keys in workflow/schemas/config.schema.yaml and their table in
config/README.md (generated blocks: ``python -m tesla.settings_blocks --write``). The other
top-level keys have declarations of their own: ``tracking`` (:mod:`tesla.tracking_settings`)
and ``datasets``, whose entries hold the data sources' keys (:mod:`tesla.data.sources`) and the
stages' blocks (:mod:`tesla.distill_settings`, :mod:`tesla.training_settings`,
:mod:`tesla.zca_settings`).
"""

from __future__ import annotations

from dataclasses import dataclass

from tesla.devices import DEVICE_NAMES, DEVICE_PATTERN
from tesla.settings import setting

__all__ = ["TopLevel"]


@dataclass(frozen=True)
class TopLevel:
    """The keys that hold for every dataset of a config: what to build, where, from which seed."""

    default_datasets: tuple[str, ...] = setting(
        ("demo",), nargs="+", config_default=["demo"], result=False,
        schema={"type": "array", "items": {"type": "string"}},
        help="datasets that `snakemake --cores all` without a target builds (every configured IPC of each)",
    )
    device: str = setting(
        "auto", result=False, schema={"type": "string", "pattern": DEVICE_PATTERN},
        help=f"device of the training jobs: {DEVICE_NAMES}",
    )
    seed: int = setting(
        0, kind=int, minimum=0,
        help="base random seed: expert k trains with seed + k, evaluation run r with seed + r; the distillation uses the seed",
    )

"""The settings of ``tesla zca``, each declared once (:mod:`tesla.settings`); no torch at import
(the workflow reads them while it builds the job graph).

From the declarations come the command line of ``tesla zca`` (its parser, and the bounds it
checks as the arguments are parsed), a dataset entry's config key ``zca_eps`` in
workflow/schemas/config.schema.yaml and its row in config/README.md (generated blocks:
``python -m tesla.settings_blocks --write``), and the zca job's params (workflow/rules/common.smk
writes them with :func:`tesla.settings.command_options`).

The normalisation a ZCA is fitted after is no config key of its own: it is the input space's
(a distill row's ``normalize``), which the workflow gives. The regulariser eps is the
whitening's (:mod:`tesla.zca`: W = U diag(1/sqrt(s + eps)) U^T), whose default lives here so
that the workflow reads it without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tesla.devices import DEVICE_NAMES
from tesla.normalizations import DEFAULT_NORMALIZATION, NORMALIZATIONS
from tesla.settings import setting

__all__ = ["DEFAULT_CHUNK", "DEFAULT_EPS", "ZcaSettings"]

#: the eigenvalue regulariser eps of the whitening (the published value)
DEFAULT_EPS = 0.1
#: images per covariance update of ``tesla zca``
DEFAULT_CHUNK = 4096


@dataclass(frozen=True)
class ZcaSettings:
    """Everything ``tesla zca`` is told: which split, where to, in which space, eps; how."""

    train: Path = setting(help="training split (tesla-images HDF5)", kind=Path, required=True, config=None)
    out: Path = setting(help="output ZCA file (tesla-zca HDF5)", kind=Path, required=True, config=None)
    normalize: str = setting(
        DEFAULT_NORMALIZATION, choices=NORMALIZATIONS, config=None, always=True,
        help="the space ZCA is fitted in (and later applied after): 'split' = the split's own mean/std; 'none' = "
             "pixels in [0, 1], as the published code; or fixed published constants",
    )
    eps: float = setting(
        DEFAULT_EPS, kind=float, above=0, config="zca_eps", always=True, schema={"$ref": "#/$defs/positive_number"},
        help=f"eigenvalue regulariser eps (positive; the paper uses {DEFAULT_EPS:g})",
        config_help=f"regulariser eps of the ZCA whitening (the published value is {DEFAULT_EPS:g})",
    )
    #: not bitwise neutral: the covariance is summed chunk by chunk, shifted by the first chunk's mean
    chunk: int = setting(DEFAULT_CHUNK, kind=int, minimum=1, config=None, help="images per covariance update")
    device: str = setting("cpu", config=None, result=False, help=f"device for the covariance: {DEVICE_NAMES}")

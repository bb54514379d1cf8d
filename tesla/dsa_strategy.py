"""DSA strategies by name: the six augmentation families and a strategy such as
``color_crop_cutout_flip_scale_rotate`` (families ``_``-joined; ``none`` for none). No torch at
import: the workflow checks a config's strategies while it builds the job graph. The families
themselves (sampling and application) are in :mod:`tesla.augment`.
"""

from __future__ import annotations

from tesla.errors import TeslaError

__all__ = ["DEFAULT_STRATEGY", "FAMILIES", "parse_strategy"]

#: the augmentation families (PAPER.md section 4)
FAMILIES: tuple[str, ...] = ("color", "crop", "cutout", "flip", "scale", "rotate")
#: the paper's strategy: every family
DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"


def parse_strategy(strategy: str) -> tuple[str, ...]:
    """'color_crop_...' -> ('color', 'crop', ...); 'none' or '' -> ()."""
    if not isinstance(strategy, str):
        raise TeslaError(f"DSA strategy must be a string such as {DEFAULT_STRATEGY!r}, got {strategy!r}")
    text = strategy.strip().lower()
    if text in ("", "none"):
        return ()
    families = tuple(text.split("_"))
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise TeslaError(
            f"DSA strategy {strategy!r}: unknown famil{'y' if len(unknown) == 1 else 'ies'} "
            f"{', '.join(map(repr, unknown))}; use '_'-joined names from {', '.join(FAMILIES)} or 'none'"
        )
    if len(set(families)) != len(families):
        raise TeslaError(f"DSA strategy {strategy!r} names a family twice")
    return families

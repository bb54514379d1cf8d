"""What the profile sets (``--workflow-profile``: `set-resources`, `set-threads`,
`default-resources`), read once from the running Snakemake.

Why the workflow reads it at all: the rules it generates (one per group of experts, one per
distill row over several processes; rule_names.py) must take the resources the profile sets
for `expert` and `distill`, and the rules of select: validation rows those of the plain rules
they stand in for, since a profile names only the rules it was written for, and the
SLURM messages say which profile key a refused request came from. Snakemake offers no
documented way to do either: `set-resources` applies by rule name only, a rule's resources
may be functions of its wildcards, input, threads and attempt, never of another rule's, and
`use rule ... as ... with:` copies the resources written in the rule, not the profile's. The
one route is ``workflow.resource_settings`` (Snakemake's ``ResourceSettings``, not a
documented interface of the Snakefile); :func:`profile_settings` is the only place that
reads it, so a change there is met in one function.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping


def _plain(value: Any) -> Any:
    """A profile's value as written: Snakemake may hand it over as a ``Resource``."""
    return value.raw if getattr(value, "raw", None) is not None else value


@dataclass(frozen=True)
class ProfileSettings:
    """The profile's `set-resources` and `set-threads` per rule, as plain values, and the
    keys its `default-resources` sets."""

    set_resources: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    set_threads: Mapping[str, Any] = field(default_factory=dict)
    default_keys: frozenset = frozenset()

    def resources(self, rule: str) -> dict:
        """The `set-resources` of ``rule`` (empty when the profile sets none)."""
        return dict(self.set_resources.get(rule) or {})

    def threads(self, rule: str, default: int) -> Any:
        """The `set-threads` of ``rule``, else ``default``."""
        return self.set_threads.get(rule, default)


def profile_settings(workflow) -> ProfileSettings:
    """What the running Snakemake's profile sets (Snakefile's ``workflow`` object)."""
    settings = workflow.resource_settings
    return ProfileSettings(
        set_resources={
            rule: {key: _plain(value) for key, value in (mapping or {}).items()}
            for rule, mapping in settings.overwrite_resources.items()
        },
        set_threads={rule: _plain(value) for rule, value in settings.overwrite_threads.items()},
        default_keys=frozenset(settings.default_resources or ()),
    )

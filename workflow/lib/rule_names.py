"""The names of the rules the workflow generates, and the profile key each rule reads.

The workflow writes one rule per group of experts (``experts.per_job`` > 1, rules/experts.smk)
and one per distill row over several processes (``distill.gpus`` > 1, rules/distill.smk), and
has three rules that stand in for a plain rule on the rows with ``select: validation``
(rules/select_sets.smk).
Their names are made here, once, because the profile knows only the rules it was written
for: every generated rule takes the `set-resources` of the rule it stands in for (`expert`,
`distill`), and the SLURM messages (slurm_glue.py) name that key. Plain Python: the rule
files and the glue import it from workflow/lib (put on ``sys.path`` by rules/common.smk).
"""

from __future__ import annotations

import re

#: the name of every rule the workflow generates for a group of experts starts so
EXPERT_GROUP_RULE = "expert_group_"
#: the name of every rule the workflow generates for a distillation over several processes starts so
DISTILL_PROCESSES_RULE = "distill_gpus_"
#: the rules of the rows with select: validation and of the datasets with a validation split
#: (rules/select_sets.smk), and the plain rule each stands in for
SELECTION_RULES = {"prepare_validation": "prepare", "distill_kept": "distill", "evaluate_selected": "evaluate_synthetic"}


def _identifier(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def expert_group_rule(dataset: str, space: str, first: int) -> str:
    """The rule for the group of experts ``first``.. of one input space, a valid identifier."""
    return _identifier(f"{EXPERT_GROUP_RULE}{dataset}_{space}_{first}")


def distill_processes_rule(dataset: str, ipc: int) -> str:
    """The rule for the distillations of one row with ``gpus`` > 1 (one torch.distributed job
    of several processes), a valid identifier."""
    return _identifier(f"{DISTILL_PROCESSES_RULE}{dataset}_ipc{ipc}")


def profile_rule(rule: str) -> str:
    """The profile's `set-resources` key of a rule: the rules of expert groups all take the
    resources of `expert`, those of distillations over several processes those of `distill`,
    the rules of select: validation rows those of their plain rules (:data:`SELECTION_RULES`),
    every other rule its own."""
    if rule.startswith(EXPERT_GROUP_RULE):
        return "expert"
    if rule.startswith(DISTILL_PROCESSES_RULE):
        return "distill"
    return SELECTION_RULES.get(rule, rule)

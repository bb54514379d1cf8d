# Which synthetic set acc.csv reports (docs/selection.md). A distill row with
# `select: validation` keeps its set every `keep_every` iterations (synthetic.kept/ beside
# synthetic.h5), evaluates every kept set and reports the one with the best accuracy on the
# dataset's validation split (resources/<dataset>/val.h5, `validation_per_class` images per
# class held out of train.h5 by tesla prepare); the per-set table eval/<engine>_<arch>.sets.csv
# also shows the final set and the best by test (the published protocol). Such rows, and
# datasets with a validation split, get the rules of select_sets.smk; the plain rules
# (prepare, distill, evaluate_synthetic) leave them out through their wildcard constraints (the
# functions below), so the jobs of every other row keep their outputs and params
# (`select: final`, the default, changes nothing).


def validation_dataset_paths() -> list[str]:
    """`<dataset>/` of the datasets whose preparation holds out a validation split (the
    look-ahead of the prepare rules' constraints)."""
    return [re.escape(f"{name}/") for name, ds in config["datasets"].items() if ds.get("validation_per_class", 0) > 0]


def selection_rows() -> list[tuple[str, int]]:
    """(dataset, IPC) of every distill row with select: validation."""
    return [
        (name, int(ipc))
        for name, ds in config["datasets"].items()
        for ipc, row in ds["distill"].items()
        if row["select"] == "validation"
    ]


def selection_row_paths() -> list[str]:
    """`<dataset>_ipc<N>/` of the select: validation rows (the look-ahead of the rules' constraints)."""
    return [re.escape(f"{d}_ipc{i}/") for d, i in selection_rows()]


def datasets_except(paths: list[str]) -> str:
    """The `dataset` constraint of a plain rule: every configured dataset, except where the
    rest of the path starts with one of `paths` (a look-ahead)."""
    datasets = wildcard_patterns()["dataset"]
    return f"(?!{'|'.join(paths)})(?:{datasets})" if paths else datasets


def only_where(paths: list[str]) -> str:
    """The `dataset` constraint of a selection rule: only where the rest of the path starts with one of `paths`."""
    return f"(?={'|'.join(paths)})(?:{wildcard_patterns()['dataset']})" if paths else "(?!)"


def keep_options(wildcards) -> str:
    """--keep-every of a select: validation row (a rerun trigger: it decides which sets exist)."""
    return distill_declared.keep_option(distill_cfg(wildcards.dataset, wildcards.ipc))


def select_options(wildcards) -> str:
    """--select validation (tesla.training_settings.KeptSetSelection; a rerun trigger)."""
    return " ".join(command_options(training.KeptSetSelection, {}, result=True, given={"select": "validation"}))


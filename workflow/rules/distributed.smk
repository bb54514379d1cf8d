# Distillations over several processes (`distill.gpus: G` > 1): which rows, the command that
# starts the processes (torchrun locally, srun under SLURM) and what such a job asks for.
# The rules are in distill.smk.


def distill_process_rows() -> list[tuple[str, int, int]]:
    """(dataset, IPC, G) of every distill row with gpus: G > 1."""
    return [
        (name, int(ipc), int(row.get("gpus", 1)))
        for name, ds in config["datasets"].items()
        for ipc, row in ds["distill"].items()
        if int(row.get("gpus", 1)) > 1
    ]


def on_slurm(resources) -> bool:
    """Whether this job goes to SLURM: the slurm executor (or its job step on the node), or,
    in a dry run (whose executor is none), resources that only a SLURM profile sets
    (slurm_partition, slurm_account)."""
    plugin = getattr(workflow, "executor_plugin", None)
    if plugin is not None and plugin.name.startswith("slurm"):
        return True
    return any(str(key).startswith("slurm_") for key in resources.keys())


def one_process_datasets() -> str:
    """The `dataset` constraint of the one-process rule: the configured datasets, except in
    the paths of rows with gpus > 1 or select: validation (a look-ahead over the rest of the path)."""
    taken = [re.escape(f"{d}_ipc{i}/") for d, i, _ in distill_process_rows()]
    return datasets_except(taken + selection_row_paths())  # rows with select: validation: rules/selection.smk


def distill_launch(wildcards, resources) -> str:
    """The command that starts `tesla distill`: itself, or for G processes torchrun (local)
    or srun (SLURM: the tasks read their rank from SLURM's environment). A function of the
    job's `resources`, so not a rerun trigger."""
    processes = int(getattr(resources, "tasks", 1) or 1)
    if processes == 1:
        return "tesla distill"
    if on_slurm(resources):
        return f"srun --ntasks={processes} --kill-on-bad-exit=1 tesla distill"
    return f"torchrun --standalone --nproc-per-node={processes} -m tesla distill"


def distill_resources(processes: int) -> dict:
    """A G-process distillation's request: the profile's `distill` resources (or the rule's),
    with G x its GPUs and G tasks, started by srun (`mpi`: the SLURM job step runs the command
    as it is, and srun in it starts the tasks)."""
    merged = stand_in_resources("distill", {**DISTILL_RESOURCES, "gpu": TRAIN_GPU})
    per_process = int(merged["gpu"] or 0)
    request = {**merged, "gpu": per_process * processes, "tasks": processes, "mpi": "srun"}
    if per_process:
        request["tasks_per_gpu"] = 1  # the plugin would otherwise ask for G tasks per GPU
    return request


def distill_threads(processes: int) -> int:
    """Threads of a G-process job: per process under SLURM (cpus_per_task), all G locally."""
    per_process = stand_in_threads("distill", TRAIN_THREADS)
    return per_process if on_slurm(PROFILE.resources("distill")) else per_process * processes

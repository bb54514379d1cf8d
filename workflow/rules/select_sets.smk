# The rules of the rows with `select: validation` and of the datasets with a validation split
# (the helpers and the reasons: selection.smk; docs/selection.md). Each is its plain rule
# (prepare, distill, evaluate_synthetic) with one more output or input; the plain rules leave
# these rows out through their wildcard constraints, so every job of the other rows is as it
# was. Logs and benchmarks follow the plain rules' patterns: the constraints give each path
# one job. The profile's set-resources and set-threads name the plain rules; these rules take
# them (stand_in_resources, stand_in_threads of common.smk), so that under SLURM they run where those do.


use rule prepare as prepare_validation with:
    """Convert a dataset with validation_per_class > 0: train.h5 without the held-out images, val.h5 with them."""
    wildcard_constraints:
        dataset=only_where(validation_dataset_paths()),
    output:
        train="resources/{dataset}/train.h5",
        test="resources/{dataset}/test.h5",
        val="resources/{dataset}/val.h5",
        report="resources/{dataset}/prepare_report.txt",
    threads: stand_in_threads("prepare_validation", PREPARE_THREADS)
    resources:
        **stand_in_resources("prepare_validation", PREPARE_RESOURCES),


# The two rules below share every setting of their plain rule but the command, which is
# recorded with each output (a changed command reruns the job): a rule inherited with
# `use rule` keeps its parent's command, so these name the shared pieces instead.
rule distill_kept:
    """Learn synthetic.h5 of a select: validation row, keeping the set every keep_every iterations in synthetic.kept/."""
    wildcard_constraints:
        dataset=only_where(selection_row_paths()),
    input:
        train="resources/{dataset}/train.h5",
        experts=row_experts,
        zca=row_zca,
    output:
        **DISTILL_OUTPUTS,
        kept=directory("results/{dataset}_ipc{ipc}/{engine}/synthetic.kept"),
    params:
        **DISTILL_PARAMS,
        keep=keep_options,
    log:
        DISTILL_LOG,
    benchmark:
        DISTILL_BENCHMARK
    threads: stand_in_threads("distill_kept", TRAIN_THREADS)
    resources:
        **stand_in_resources("distill_kept", {**DISTILL_RESOURCES, "gpu": TRAIN_GPU}),
    conda:
        "../envs/tesla.yaml"
    shell:
        # one process (select: validation with gpus > 1 is refused), so `tesla distill` itself
        "tesla distill --train {input.train} --experts {input.experts} --out {output.synthetic} "
        "{params.options} {params.keep} {params.zca} --metrics {output.metrics} --grid-dir {output.grids} "
        "{params.run} --device {params.device} > {log} 2>&1"


rule evaluate_selected:
    """Evaluate every kept set of a select: validation row; the runs of the best set on the validation split."""
    wildcard_constraints:
        dataset=only_where(selection_row_paths()),
    input:
        kept="results/{dataset}_ipc{ipc}/{engine}/synthetic.kept",
        validation="resources/{dataset}/val.h5",
        test="resources/{dataset}/test.h5",
    output:
        runs=EVALUATE_OUTPUT,
        sets="results/{dataset}_ipc{ipc}/eval/{engine}_{arch}.sets.csv",
    params:
        **EVALUATE_PARAMS,
        select=select_options,
    log:
        EVALUATE_LOG,
    benchmark:
        EVALUATE_BENCHMARK
    threads: stand_in_threads("evaluate_selected", TRAIN_THREADS)
    resources:
        **stand_in_resources("evaluate_selected", {**EVALUATE_RESOURCES, "gpu": TRAIN_GPU}),
    conda:
        "../envs/tesla.yaml"
    shell:
        "tesla evaluate --kept-sets {input.kept} --validation {input.validation} {params.select} --test {input.test} "
        "{params.options} {params.run} --out {output.runs} --sets-out {output.sets} --device {params.device} "
        "> {log} 2>&1"

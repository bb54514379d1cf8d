# The rules of the rows with `select: validation` and of the datasets with a validation split
# (the helpers and the reasons: selection.smk; docs/selection.md).


rule prepare_validation:
    """Convert a dataset with validation_per_class > 0: train.h5 without the held-out images, val.h5 with them."""
    wildcard_constraints:
        dataset=only_where([re.escape(f"{d}/") for d in validation_datasets()]),
    input:
        check_raw_data,
    output:
        train="resources/{dataset}/train.h5",
        test="resources/{dataset}/test.h5",
        val="resources/{dataset}/val.h5",
        report="resources/{dataset}/prepare_report.txt",
    params:
        options=prepare_options,
        method=method("prepare"),
    log:
        "results/logs/prepare/{dataset}.log",
    benchmark:
        "results/benchmarks/prepare/{dataset}.tsv"
    threads: 4
    resources:
        mem_mb=8000,
        runtime=24 * 60,
    conda:
        "../envs/tesla.yaml"
    shell:
        "tesla prepare {params.options} --out-dir resources/{wildcards.dataset} --workers {threads} > {log} 2>&1"


rule distill_kept:
    """Learn synthetic.h5 of a select: validation row, keeping the set every keep_every iterations in synthetic.kept/."""
    wildcard_constraints:
        dataset=only_where(selection_row_paths()),
    input:
        train="resources/{dataset}/train.h5",
        experts=row_experts,
        zca=row_zca,
    output:
        synthetic="results/{dataset}_ipc{ipc}/{engine}/synthetic.h5",
        metrics="results/{dataset}_ipc{ipc}/{engine}/metrics.csv",
        grids=directory("results/{dataset}_ipc{ipc}/{engine}/grids"),
        kept=directory("results/{dataset}_ipc{ipc}/{engine}/synthetic.kept"),
    params:
        device=job_device,
        options=distill_options,
        keep=keep_options,
        zca=zca_option,
        method=method("distill"),
        upstream=distill_upstream,
        run=distill_run_options,
    log:
        "results/logs/distill/{dataset}_ipc{ipc}_{engine}.log",
    benchmark:
        "results/benchmarks/distill/{dataset}_ipc{ipc}_{engine}.tsv"
    threads: TRAIN_THREADS
    resources:
        mem_mb=32000,
        runtime=48 * 60,
        gpu=TRAIN_GPU,
    conda:
        "../envs/tesla.yaml"
    shell:
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
        runs="results/{dataset}_ipc{ipc}/eval/{engine}_{arch}.csv",
        sets="results/{dataset}_ipc{ipc}/eval/{engine}_{arch}.sets.csv",
    params:
        device=job_device,
        options=evaluate_options,
        select=select_options,
        run=evaluate_run_options,
        method=evaluate_method,
        upstream=evaluate_synthetic_upstream,
    log:
        "results/logs/evaluate/{dataset}_ipc{ipc}/{engine}_{arch}.log",
    benchmark:
        "results/benchmarks/evaluate/{dataset}_ipc{ipc}/{engine}_{arch}.tsv"
    threads: TRAIN_THREADS
    resources:
        mem_mb=16000,
        runtime=6 * 60,
        gpu=TRAIN_GPU,
    conda:
        "../envs/tesla.yaml"
    shell:
        "tesla evaluate --kept-sets {input.kept} --validation {input.validation} {params.select} --test {input.test} "
        "{params.options} {params.run} --out {output.runs} --sets-out {output.sets} --device {params.device} "
        "> {log} 2>&1"

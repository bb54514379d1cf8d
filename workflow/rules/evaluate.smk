# Evaluation: one job per (dataset, IPC, method, architecture), so adding an architecture
# runs only its own jobs. The methods are the engines of the row (their distilled sets) and
# 'random' (random real images at the same IPC, in the experts' input space: the baseline).
#
# The settings of an engine's evaluation, shared with evaluate_selected (rules/select_sets.smk):
EVALUATE_RESOURCES = {"mem_mb": 16000, "runtime": 6 * 60}
EVALUATE_OUTPUT = "results/{dataset}_ipc{ipc}/eval/{engine}_{arch}.csv"
EVALUATE_PARAMS = dict(
    device=job_device,
    options=evaluate_options,
    run=evaluate_run_options,
    method=evaluate_method,
    upstream=evaluate_synthetic_upstream,
)
EVALUATE_LOG = "results/logs/evaluate/{dataset}_ipc{ipc}/{engine}_{arch}.log"
EVALUATE_BENCHMARK = "results/benchmarks/evaluate/{dataset}_ipc{ipc}/{engine}_{arch}.tsv"


rule evaluate_synthetic:
    """Train fresh <arch> networks on the <engine> set and test them on the real test split."""
    wildcard_constraints:
        dataset=datasets_except(selection_row_paths()),  # select: validation rows: evaluate_selected
    input:
        synthetic="results/{dataset}_ipc{ipc}/{engine}/synthetic.h5",
        test="resources/{dataset}/test.h5",
    output:
        EVALUATE_OUTPUT,
    params:
        **EVALUATE_PARAMS,
    log:
        EVALUATE_LOG,
    benchmark:
        EVALUATE_BENCHMARK
    threads: TRAIN_THREADS
    resources:
        **EVALUATE_RESOURCES,
        gpu=TRAIN_GPU,
    conda:
        "../envs/tesla.yaml"
    shell:
        "tesla evaluate --synthetic {input.synthetic} --test {input.test} {params.options} "
        "{params.run} --out {output} --device {params.device} > {log} 2>&1"


rule evaluate_random:
    """Same protocol on <ipc> random real training images per class."""
    input:
        train="resources/{dataset}/train.h5",
        test="resources/{dataset}/test.h5",
        zca=row_zca,
    output:
        "results/{dataset}_ipc{ipc}/eval/random_{arch}.csv",
    params:
        device=job_device,
        options=evaluate_options,
        run=evaluate_run_options,
        baseline=random_baseline_options,
        zca=zca_option,
        method=evaluate_method,
        upstream=evaluate_random_upstream,
    log:
        "results/logs/evaluate/{dataset}_ipc{ipc}/random_{arch}.log",
    benchmark:
        "results/benchmarks/evaluate/{dataset}_ipc{ipc}/random_{arch}.tsv"
    threads: TRAIN_THREADS
    resources:
        **EVALUATE_RESOURCES,
        gpu=TRAIN_GPU,
    conda:
        "../envs/tesla.yaml"
    shell:
        "tesla evaluate --random --train {input.train} --test {input.test} {params.baseline} "
        "{params.zca} {params.options} {params.run} --out {output} --device {params.device} > {log} 2>&1"

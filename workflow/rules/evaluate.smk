# Evaluation: one job per (dataset, IPC, method, architecture), so adding an architecture
# runs only its own jobs. Method 'tesla' trains on the distilled set, 'random' on random
# real images at the same IPC (the baseline).


rule evaluate_synthetic:
    """Train fresh <arch> networks on the distilled set and test them on the real test split."""
    input:
        synthetic="distill/{dataset}_ipc{ipc}/synthetic.h5",
        test="data/{dataset}/test.h5",
    output:
        "eval/{dataset}_ipc{ipc}/tesla_{arch}.csv",
    params:
        device=job_device,
        options=evaluate_options,
    log:
        "logs/evaluate/{dataset}_ipc{ipc}/tesla_{arch}.log",
    benchmark:
        "benchmarks/evaluate/{dataset}_ipc{ipc}/tesla_{arch}.tsv"
    threads: TRAIN_THREADS
    resources:
        mem_mb=16000,
        runtime=6 * 60,
        gpu=TRAIN_GPU,
    conda:
        "../../envs/tesla.yaml"
    shell:
        "tesla evaluate --synthetic {input.synthetic} --test {input.test} {params.options} "
        "--out {output} --device {params.device} > {log} 2>&1"


rule evaluate_random:
    """Same protocol on <ipc> random real training images per class."""
    input:
        train="data/{dataset}/train.h5",
        test="data/{dataset}/test.h5",
        zca=zca_input,
    output:
        "eval/{dataset}_ipc{ipc}/random_{arch}.csv",
    params:
        device=job_device,
        options=evaluate_options,
        baseline=random_baseline_options,
        zca=zca_option,
    log:
        "logs/evaluate/{dataset}_ipc{ipc}/random_{arch}.log",
    benchmark:
        "benchmarks/evaluate/{dataset}_ipc{ipc}/random_{arch}.tsv"
    threads: TRAIN_THREADS
    resources:
        mem_mb=16000,
        runtime=6 * 60,
        gpu=TRAIN_GPU,
    conda:
        "../../envs/tesla.yaml"
    shell:
        "tesla evaluate --random --train {input.train} --test {input.test} {params.baseline} "
        "{params.zca} {params.options} --out {output} --device {params.device} > {log} 2>&1"

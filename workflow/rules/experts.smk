# Expert trajectories: one job per expert network (independent, so they spread over GPUs
# or cluster nodes), in one folder per input space (the normalisation and ZCA their inputs
# went through): distill rows of one input space share their experts. Training rules ask
# for the `gpu` resource when a GPU is visible, so that the local profile's
# `--resources gpu=1` runs one at a time on a workstation's GPU (see TRAIN_GPU in
# common.smk); on SLURM the profile's `gpu: 1` becomes `--gpus=1`.


rule expert:
    """Train expert k on the real training split, in input space <space>, saving its
    parameter trajectory."""
    input:
        train="resources/{dataset}/train.h5",
        test="resources/{dataset}/test.h5",
        zca=space_zca,
    output:
        "results/{dataset}/experts/{space}/expert_{k}.h5",
    params:
        device=job_device,
        options=expert_options,
        zca=zca_option,
        method=method("experts"),
    log:
        "results/logs/experts/{dataset}/{space}/expert_{k}.log",
    benchmark:
        "results/benchmarks/experts/{dataset}/{space}/expert_{k}.tsv"
    threads: TRAIN_THREADS
    resources:
        mem_mb=16000,
        runtime=12 * 60,
        gpu=TRAIN_GPU,
    conda:
        "../envs/tesla.yaml"
    shell:
        "tesla experts --train {input.train} --test {input.test} --out {output} "
        "{params.options} {params.zca} --device {params.device} > {log} 2>&1"

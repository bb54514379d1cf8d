# Expert trajectories, in one folder per input space (the normalisation and ZCA their inputs
# went through): distill rows of one input space share their experts. By default one job per
# expert network (independent, so they spread over GPUs or cluster nodes); with
# `experts.per_job: P` one job trains P experts in one process on one device (one rule per
# group, generated below, with the `expert` rule's resources), each still in its own file.
# Training rules ask for the `gpu` resource when a GPU is visible, so that the local
# profile's `--resources gpu=1` runs one at a time on a workstation's GPU (see TRAIN_GPU in
# common.smk); on SLURM the profile's `gpu: 1` becomes `--gpus=1`, one GPU per job.


rule expert:
    """Train expert k on the real training split, in input space <space>, saving its
    parameter trajectory."""
    wildcard_constraints:
        dataset="|".join(map(re.escape, single_expert_datasets())) or "(?!)",
    input:
        train="resources/{dataset}/train.h5",
        test="resources/{dataset}/test.h5",
        zca=space_zca,
    output:
        "results/{dataset}/experts/{space}/expert_{k}.h5",
    params:
        device=job_device,
        options=expert_options,
        run=expert_run_options,
        zca=zca_option,
        method=expert_method,
        upstream=experts_upstream,
    log:
        "results/logs/experts/{dataset}/{space}/expert_{k}.log",
    benchmark:
        "results/benchmarks/experts/{dataset}/{space}/expert_{k}.tsv"
    threads: TRAIN_THREADS
    resources:
        **EXPERT_RESOURCES,
        gpu=TRAIN_GPU,
    conda:
        "../envs/tesla.yaml"
    shell:
        "tesla experts --train {input.train} --test {input.test} --out {output} "
        "{params.options} {params.run} {params.zca} --device {params.device} > {log} 2>&1"


for _dataset, _space, _ks in expert_groups():

    rule:
        """Train experts k1..kP of one input space in one process (experts.per_job)."""
        name:
            rule_names.expert_group_rule(_dataset, _space, _ks[0])
        input:
            train=split_file(_dataset, "train"),
            test=split_file(_dataset, "test"),
            zca=space_zca(Namespace(dataset=_dataset, space=_space)),
        output:
            [f"results/{_dataset}/experts/{_space}/expert_{k}.h5" for k in _ks],
        params:
            device=job_device,
            options=expert_options(Namespace(dataset=_dataset, space=_space)),
            run=expert_run_options,
            zca=zca_option,
            method=expert_method(Namespace(dataset=_dataset)),
            upstream=experts_upstream(Namespace(dataset=_dataset, space=_space)),
        log:
            f"results/logs/experts/{_dataset}/{_space}/experts_{_ks[0]}-{_ks[-1]}.log",
        benchmark:
            f"results/benchmarks/experts/{_dataset}/{_space}/experts_{_ks[0]}-{_ks[-1]}.tsv"
        threads: stand_in_threads("expert", TRAIN_THREADS)
        resources:
            **group_resources(len(_ks)),
        conda:
            "../envs/tesla.yaml"
        shell:
            "tesla experts --train {input.train} --test {input.test} --out {output} "
            "{params.options} {params.run} {params.zca} --device {params.device} > {log} 2>&1"

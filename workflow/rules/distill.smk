# Distillation: one job per (dataset, IPC, engine), matching the trajectories of the
# experts of the row's input space. A row that lists several engines distils one set per
# engine from the same experts.


rule distill:
    """Learn results/<dataset>_ipc<N>/<engine>/synthetic.h5; resumable after a kill."""
    input:
        train="resources/{dataset}/train.h5",
        experts=row_experts,
        zca=row_zca,
    output:
        synthetic="results/{dataset}_ipc{ipc}/{engine}/synthetic.h5",
        metrics="results/{dataset}_ipc{ipc}/{engine}/metrics.csv",
        grids=directory("results/{dataset}_ipc{ipc}/{engine}/grids"),
    params:
        device=job_device,
        options=distill_options,
        zca=zca_option,
        method=method("distill"),
        upstream=distill_upstream,
        # Not settings of the result: the checkpoint folder (the checkpoint is not an
        # output: Snakemake deletes the outputs of a failed job, but the checkpoint must
        # survive a kill so that the rerun resumes from it), its interval, the guard.
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
        "{params.options} {params.zca} --metrics {output.metrics} --grid-dir {output.grids} "
        "{params.run} --device {params.device} > {log} 2>&1"

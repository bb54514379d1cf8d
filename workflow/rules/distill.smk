# Distillation: one job per (dataset, IPC), matching the experts' trajectories.


rule distill:
    """Learn data/<dataset>_ipc<N>/synthetic.h5; resumable from its checkpoint after a kill."""
    input:
        train="data/{dataset}/train.h5",
        experts=expert_files,
        zca=zca_input,
    output:
        synthetic="distill/{dataset}_ipc{ipc}/synthetic.h5",
        metrics="distill/{dataset}_ipc{ipc}/metrics.csv",
        grids=directory("distill/{dataset}_ipc{ipc}/grids"),
    params:
        device=job_device,
        options=distill_options,
        every=distill_checkpoint_every,
        guard=distill_guard_options,
        zca=zca_option,
        # Not an output: Snakemake deletes the outputs of a failed job, but the checkpoint
        # must survive a kill (preemption, scancel) so that the rerun resumes from it.
        checkpoint=distill_checkpoint,
    log:
        "logs/distill/{dataset}_ipc{ipc}.log",
    benchmark:
        "benchmarks/distill/{dataset}_ipc{ipc}.tsv"
    threads: TRAIN_THREADS
    resources:
        mem_mb=32000,
        runtime=48 * 60,
        gpu=TRAIN_GPU,
    conda:
        "../../envs/tesla.yaml"
    shell:
        "tesla distill --train {input.train} --experts {input.experts} --out {output.synthetic} "
        "{params.options} {params.zca} --metrics {output.metrics} --grid-dir {output.grids} "
        "--checkpoint {params.checkpoint} --checkpoint-every {params.every} {params.guard} --device {params.device} "
        "> {log} 2>&1 && rm -f {params.checkpoint}"

# Distillation: one job per (dataset, IPC, engine), matching the trajectories of the
# experts of the row's input space. A row that lists several engines distils one set per
# engine from the same experts.
#
# A row with `gpus: G` > 1 runs as one torch.distributed job of G processes (one per GPU;
# CPU processes with device cpu): locally started by torchrun, under SLURM by srun in a job
# that asks for G GPUs and G tasks. Such rows get a rule of their own (generated below, with
# the `distill` rule's settings and the profile's `distill` resources x G); the result does
# not depend on G beyond float round-off, so G is not a rerun trigger.


DISTILL_RESOURCES = {"mem_mb": 32000, "runtime": 48 * 60}
DISTILL_OUTPUTS = dict(
    synthetic="results/{dataset}_ipc{ipc}/{engine}/synthetic.h5",
    metrics="results/{dataset}_ipc{ipc}/{engine}/metrics.csv",
    grids=directory("results/{dataset}_ipc{ipc}/{engine}/grids"),
)
DISTILL_PARAMS = dict(  # with launch=distill_launch in the rules whose command starts with it
    device=job_device,
    options=distill_options,
    zca=zca_option,
    method=method("distill"),
    upstream=distill_upstream,
    # Not settings of the result: the checkpoint folder (the checkpoint is not an
    # output: Snakemake deletes the outputs of a failed job, but the checkpoint must
    # survive a kill so that the rerun resumes from it), its interval, the guard.
    run=distill_run_options,
)
DISTILL_LOG = "results/logs/distill/{dataset}_ipc{ipc}_{engine}.log"
DISTILL_BENCHMARK = "results/benchmarks/distill/{dataset}_ipc{ipc}_{engine}.tsv"
DISTILL_SHELL = (
    "{params.launch} --train {input.train} --experts {input.experts} --out {output.synthetic} "
    "{params.options} {params.zca} --metrics {output.metrics} --grid-dir {output.grids} "
    "{params.run} --device {params.device} > {log} 2>&1"
)


rule distill:
    """Learn results/<dataset>_ipc<N>/<engine>/synthetic.h5; resumable after a kill."""
    wildcard_constraints:
        dataset=one_process_datasets(),
    input:
        train="resources/{dataset}/train.h5",
        experts=row_experts,
        zca=row_zca,
    output:
        **DISTILL_OUTPUTS,
    params:
        launch=distill_launch,
        **DISTILL_PARAMS,
    log:
        DISTILL_LOG,
    benchmark:
        DISTILL_BENCHMARK
    threads: TRAIN_THREADS
    resources:
        **DISTILL_RESOURCES,
        gpu=TRAIN_GPU,
    conda:
        "../envs/tesla.yaml"
    shell:
        DISTILL_SHELL


for _dataset, _ipc, _processes in distill_process_rows():

    rule:
        """Learn one row's synthetic sets over G processes (distill.gpus: G)."""
        name:
            rule_names.distill_processes_rule(_dataset, _ipc)
        wildcard_constraints:
            dataset=re.escape(_dataset),
            ipc=str(_ipc),
        input:
            train="resources/{dataset}/train.h5",
            experts=row_experts,
            zca=row_zca,
        output:
            **DISTILL_OUTPUTS,
        params:
            launch=distill_launch,
            **DISTILL_PARAMS,
        log:
            DISTILL_LOG,
        benchmark:
            DISTILL_BENCHMARK
        threads: distill_threads(_processes)
        resources:
            **distill_resources(_processes),
        conda:
            "../envs/tesla.yaml"
        shell:
            DISTILL_SHELL

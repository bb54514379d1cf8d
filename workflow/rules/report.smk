# acc.csv (one row per method and architecture, plus the experts' 'full' row) and the
# plots shown by `snakemake --report report.html`.


rule results:
    """Collect the evaluations of one (dataset, IPC) into results/<dataset>_ipc<N>/acc.csv."""
    input:
        runs=evaluation_files,
        experts=full_data_experts,
    output:
        report(
            "results/{dataset}_ipc{ipc}/acc.csv",
            caption="../report/acc.rst",
            category="Accuracy",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "IPC": "{ipc}", "figure": "acc.csv"},
        ),
    params:
        experts=experts_option,
        method=method("results"),
        upstream=results_upstream,
    log:
        "results/logs/results/{dataset}_ipc{ipc}.log",
    benchmark:
        "results/benchmarks/results/{dataset}_ipc{ipc}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/tesla.yaml"
    shell:
        "tesla results --runs {input.runs} {params.experts} --out {output} > {log} 2>&1"


rule report:
    """Distillation loss and learning-rate curves, and the final synthetic images."""
    input:
        synthetic="results/{dataset}_ipc{ipc}/{engine}/synthetic.h5",
        metrics="results/{dataset}_ipc{ipc}/{engine}/metrics.csv",
    output:
        curves=report(
            "results/{dataset}_ipc{ipc}/{engine}/curves.png",
            caption="../report/curves.rst",
            category="Distillation curves",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "IPC": "{ipc}", "engine": "{engine}", "figure": "loss and learning rate"},
        ),
        grid=report(
            "results/{dataset}_ipc{ipc}/{engine}/grid.png",
            caption="../report/grid.rst",
            category="Synthetic images",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "IPC": "{ipc}", "engine": "{engine}", "figure": "synthetic images"},
        ),
    params:
        method=method("report"),
        upstream=report_upstream,
    log:
        "results/logs/report/{dataset}_ipc{ipc}_{engine}.log",
    benchmark:
        "results/benchmarks/report/{dataset}_ipc{ipc}_{engine}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=10,
    conda:
        "../envs/tesla.yaml"
    shell:
        "tesla report --synthetic {input.synthetic} --metrics {input.metrics} "
        "--curves {output.curves} --grid {output.grid} > {log} 2>&1"

# Raw data -> class-sorted uint8 HDF5 splits (tesla prepare), and optional ZCA whitening.


rule prepare:
    """Convert a configured dataset into data/<dataset>/train.h5 and test.h5."""
    input:
        # Not a file: checks the raw-data path of the requested dataset while the DAG is
        # built, so a missing ImageNet path fails before any job starts. The raw path is a
        # param (rerun when it changes) rather than an input (an archive's mtime must not
        # trigger hours of preprocessing).
        check_raw_data,
    output:
        train="data/{dataset}/train.h5",
        test="data/{dataset}/test.h5",
        report="data/{dataset}/prepare_report.txt",
    params:
        options=prepare_options,
    log:
        "logs/prepare/{dataset}.log",
    benchmark:
        "benchmarks/prepare/{dataset}.tsv"
    threads: 4
    resources:
        mem_mb=8000,
        runtime=24 * 60,
    conda:
        "../../envs/tesla.yaml"
    shell:
        "tesla prepare {params.options} --out-dir data/{wildcards.dataset} --workers {threads} > {log} 2>&1"


rule zca:
    """Fit ZCA whitening on the training split (only for datasets with zca: true)."""
    input:
        train="data/{dataset}/train.h5",
    output:
        "data/{dataset}/zca.h5",
    params:
        options=zca_options,
    log:
        "logs/zca/{dataset}.log",
    benchmark:
        "benchmarks/zca/{dataset}.tsv"
    threads: 4
    resources:
        mem_mb=8000,
        runtime=60,
    conda:
        "../../envs/tesla.yaml"
    shell:
        "tesla zca --train {input.train} --out {output} {params.options} > {log} 2>&1"

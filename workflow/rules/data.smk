# Raw data -> class-sorted uint8 HDF5 splits (tesla prepare), and ZCA whitening for the
# input spaces that use it.

PREPARE_RESOURCES = {"mem_mb": 8000, "runtime": 24 * 60}
PREPARE_THREADS = 4


rule prepare:
    """Convert a configured dataset into resources/<dataset>/train.h5 and test.h5."""
    wildcard_constraints:
        dataset=datasets_except(validation_dataset_paths()),  # those: prepare_validation
    input:
        # Not a file: checks the raw-data path of the requested dataset while the DAG is
        # built, so a missing ImageNet path fails before any job starts. The raw path is a
        # param (rerun when it changes) rather than an input (an archive's mtime must not
        # trigger hours of preprocessing).
        check_raw_data,
    output:
        train="resources/{dataset}/train.h5",
        test="resources/{dataset}/test.h5",
        report="resources/{dataset}/prepare_report.txt",
    params:
        options=prepare_options,
        method=method("prepare"),
    log:
        "results/logs/prepare/{dataset}.log",
    benchmark:
        "results/benchmarks/prepare/{dataset}.tsv"
    threads: PREPARE_THREADS
    resources:
        **PREPARE_RESOURCES,
    conda:
        "../envs/tesla.yaml"
    shell:
        "tesla prepare {params.options} --out-dir resources/{wildcards.dataset} --workers {threads} > {log} 2>&1"


rule zca:
    """Fit ZCA whitening on the training split after normalisation <normalize> (for the
    input spaces with zca: true)."""
    input:
        train="resources/{dataset}/train.h5",
    output:
        "resources/{dataset}/zca_{normalize}.h5",
    params:
        options=zca_options,
        method=method("zca"),
        upstream=zca_upstream,
    log:
        "results/logs/zca/{dataset}_{normalize}.log",
    benchmark:
        "results/benchmarks/zca/{dataset}_{normalize}.tsv"
    threads: 4
    resources:
        mem_mb=8000,
        runtime=60,
    conda:
        "../envs/tesla.yaml"
    shell:
        "tesla zca --train {input.train} --out {output} {params.options} > {log} 2>&1"

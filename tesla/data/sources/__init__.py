"""Raw dataset sources for ``tesla prepare``: each turns user files into a :class:`DatasetPlan`.

=================  ===================================================  ==========
source             input                                                 default S
=================  ===================================================  ==========
``demo``           scikit-learn's bundled digits (no input)              8
``mnist``          the official idx files (``.gz`` or not)               28
``fashion-mnist``  the official idx files                                28
``cifar10``        ``cifar-10-batches-py/`` or ``cifar-10-python.tar.gz``  32
``cifar100``       ``cifar-100-python/`` or ``cifar-100-python.tar.gz``   32
``imagenet``       train folders / tars, val folder or tar + labels      64
                   (or, recognised: downsampled batches, parquet shards)
``imagenet-downsampled``  ``train_data_batch_1..10`` (+ ``.npz``), ``val_data``  native S
``parquet``        ``*.parquet`` shards: encoded-image + label columns   64
``folder``         any class-folder tree or tar of one                   (required)
=================  ===================================================  ==========
"""

from __future__ import annotations

from tesla.data.sources.base import (
    ArraySplit,
    ClassFiles,
    DatasetPlan,
    EncodedSplit,
    SourceOptions,
)

SOURCES = ("demo", "mnist", "fashion-mnist", "cifar10", "cifar100", "imagenet", "imagenet-downsampled", "parquet", "folder")


def plan_source(source: str, opts: SourceOptions, name: str | None = None) -> DatasetPlan:
    """The :class:`DatasetPlan` of ``source`` (one of :data:`SOURCES`) for these options."""
    if source == "demo":
        from tesla.data.sources.demo import plan_demo

        return plan_demo(opts, name)
    if source in ("mnist", "fashion-mnist"):
        from tesla.data.sources.idx import plan_idx

        return plan_idx(opts, source, name)
    if source in ("cifar10", "cifar100"):
        from tesla.data.sources.cifar import plan_cifar

        return plan_cifar(opts, source, name)
    if source == "imagenet":
        from tesla.data.sources.downsampled import is_downsampled_input, plan_downsampled
        from tesla.data.sources.parquet import is_parquet_input, plan_parquet

        # ImageNet as users hold it: the same entry takes downsampled batches and parquet shards
        if opts.input is not None and is_downsampled_input(opts.input):
            return plan_downsampled(opts, name or "imagenet")
        if opts.input is not None and is_parquet_input(opts.input):
            return plan_parquet(opts, name or "imagenet", default_resolution=64)
        from tesla.data.sources.folder import plan_imagenet

        return plan_imagenet(opts, name)
    if source == "imagenet-downsampled":
        from tesla.data.sources.downsampled import plan_downsampled

        return plan_downsampled(opts, name)
    if source == "parquet":
        from tesla.data.sources.parquet import plan_parquet

        return plan_parquet(opts, name)
    if source == "folder":
        from tesla.data.sources.folder import plan_folder

        return plan_folder(opts, name)
    raise ValueError(f"unknown source {source!r}")


__all__ = ["SOURCES", "ArraySplit", "ClassFiles", "DatasetPlan", "EncodedSplit", "SourceOptions", "plan_source"]

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

SOURCES = ("demo", "mnist", "fashion-mnist", "cifar10", "cifar100", "imagenet", "folder")


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
        from tesla.data.sources.folder import plan_imagenet

        return plan_imagenet(opts, name)
    if source == "folder":
        from tesla.data.sources.folder import plan_folder

        return plan_folder(opts, name)
    raise ValueError(f"unknown source {source!r}")


__all__ = ["SOURCES", "ArraySplit", "ClassFiles", "DatasetPlan", "EncodedSplit", "SourceOptions", "plan_source"]

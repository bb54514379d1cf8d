"""Raw dataset sources for ``tesla prepare``: each turns user files into a :class:`DatasetPlan`.

=========================  ==================================================  ==========
source                     input                                               default S
=========================  ==================================================  ==========
``demo``                   scikit-learn's bundled digits (no input)            8
``mnist``                  the official idx files (``.gz`` or not)             28
``fashion-mnist``          the official idx files                              28
``cifar10``                ``cifar-10-batches-py/`` or ``.tar.gz``              32
``cifar100``               ``cifar-100-python/`` or ``.tar.gz``                 32
``imagenet``               train folders / tars, val folder or tar + labels    64
                           (or, recognised: downsampled batches, parquet)
``imagenet-downsampled``   ``train_data_batch_1..10`` (+ ``.npz``), val_data   native S
``parquet``                ``*.parquet`` shards: encoded-image + label columns (required)
``folder``                 any class-folder tree or tar of one                 (required)
=========================  ==================================================  ==========

Each source module declares its sources once (``SOURCES``, see
:mod:`tesla.data.sources.registry`); the registry builds ``tesla prepare``'s parser and the
workflow's config keys and command line from those declarations.
"""

from __future__ import annotations

from tesla.data.sources.base import (
    ArraySplit,
    ClassFiles,
    DatasetPlan,
    EncodedSplit,
    SourceOptions,
    StreamedSplit,
)


def plan_source(source: str, opts: SourceOptions, name: str | None = None) -> DatasetPlan:
    """The :class:`DatasetPlan` of a registered source for these options (empty splits refused)."""
    from tesla.data.sources.registry import plan_source as plan

    return plan(source, opts, name)


__all__ = ["ArraySplit", "ClassFiles", "DatasetPlan", "EncodedSplit", "SourceOptions", "StreamedSplit", "plan_source"]

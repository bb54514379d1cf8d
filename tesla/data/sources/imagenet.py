"""ImageNet-1K in whichever form users hold it (the ``imagenet`` source).

* the raw JPEGs: ``ILSVRC2012_img_train.tar`` (a tar of per-class ``<wnid>.tar``), its
  extracted ``train/<wnid>/`` folders, a tar of those, or a folder holding ``train/`` and
  ``val/``; the validation images as ``ILSVRC2012_img_val.tar`` or its flat folder with a
  labels file or the devkit (:mod:`tesla.data.sources.devkit`), or sorted into
  ``val/<wnid>/`` folders (read as class-folder trees whose classes must be WordNet ids,
  :func:`tesla.data.sources.folder.plan_tree`);
* Downsampled-ImageNet batches (:mod:`tesla.data.sources.downsampled`) and parquet shards
  (:mod:`tesla.data.sources.parquet`), recognised from the files given.

Class index = position of the WordNet id in sorted order, whichever the form; 64 x 64 by
default (the batches: their own size).
"""

from __future__ import annotations

from tesla.data.sources.base import DatasetPlan, SourceOptions
from tesla.data.sources.downsampled import is_downsampled_input, plan_downsampled
from tesla.data.sources.folder import TREE_OPTIONS, plan_tree, tree_input_problems
from tesla.data.sources.options import IMAGE_COLUMN, LABEL_COLUMN
from tesla.data.sources.parquet import is_parquet_input, plan_parquet
from tesla.data.sources.registry import DataSource

DEFAULT_RESOLUTION = 64


def plan_imagenet(opts: SourceOptions, name: str | None = None) -> DatasetPlan:
    """ImageNet-1K from the raw JPEGs, Downsampled-ImageNet batches or parquet shards."""
    name = name or "imagenet"
    if opts.input is not None and is_downsampled_input(opts.input):
        return plan_downsampled(opts, name)
    if opts.input is not None and is_parquet_input(opts.input):
        return plan_parquet(opts, name, default_resolution=DEFAULT_RESOLUTION)
    return plan_tree(opts, "imagenet", name, wnids=True, default_resolution=DEFAULT_RESOLUTION)


def imagenet_input_problems(opts: SourceOptions, name) -> list[str]:
    """The inputs the raw JPEGs' layout needs together (batches and shards find their own test split)."""
    if opts.input is not None and (is_downsampled_input(opts.input) or is_parquet_input(opts.input)):
        return []
    return tree_input_problems(opts, name)


SOURCES = (
    DataSource(
        "imagenet",
        "train/<wnid>/ folders, a tar of them, or ILSVRC2012_img_train.tar; a folder of Downsampled-ImageNet batches "
        "or of parquet shards is recognised and read as by those sources",
        plan_imagenet,
        (*TREE_OPTIONS, IMAGE_COLUMN, LABEL_COLUMN),
        {
            "input": "ILSVRC2012_img_train.tar (1000 inner <wnid>.tar files), or an extracted train folder of class "
            "folders <wnid>/*.JPEG, or a folder holding train/ and val/ class folders (or Downsampled-ImageNet batches, "
            "or parquet shards)",
            "test_input": "ILSVRC2012_img_val.tar or its extracted flat folder, labelled by the test labels "
            "(the devkit or LOC_val_solution.csv), or a val folder sorted into class folders <wnid>/*.JPEG",
            "test_labels": "ILSVRC2012_devkit_t12.tar.gz (or its extracted folder) labels the 50,000 images of "
            "ILSVRC2012_img_val.tar, all of them; LOC_val_solution.csv also labels a subset",
            "synsets": "lines '<wnid> <name, name2, ...>' (LOC_synset_mapping.txt); for Downsampled-ImageNet batches "
            "as for imagenet-downsampled",
            "resolution": "64 (Downsampled-ImageNet batches: their own size)",
        },
        explicit_defaults=("resize", "image_column", "label_column"),
        input_problems=imagenet_input_problems,
    ),
)

"""The settings of ``tesla prepare``, each declared once (:class:`Option`).

An option is either *common*, taken by every source and read by the conversion
(:mod:`tesla.prepare`: output folder, resolution, resize rule, ...), or a *source option*,
read by a source's planner through :class:`tesla.data.sources.base.SourceOptions` and taken
only by the sources that list it in their registration
(:class:`tesla.data.sources.registry.DataSource`). From these declarations the registry builds
``tesla prepare``'s parser, the dataset keys of the workflow's config schema and the
workflow's command line; a source module may declare an option of its own the same way.

What one source expects in an option (its input layouts, its default resolution) is a
*note* of that source (``DataSource.notes``), appended to the option's help.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from tesla.arguments import finite_float, int_in_range
from tesla.data.imaging import RESIZE_FILTERS, RESIZE_RULES


@dataclass(frozen=True)
class Option:
    """One setting: ``key`` is its name in Python, in the config and (with '-') on the command line."""

    key: str
    help: str
    kind: type = str  # str, int, float, Path or bool (a flag)
    default: Any = None
    choices: tuple | None = None
    #: taken by every source and read by the conversion; else a source option (SourceOptions)
    common: bool = False
    #: a dataset-level config key of the workflow (False: the workflow sets it itself)
    config: bool = True
    #: a source that takes it cannot run without it (the workflow checks it before any job)
    required: bool = False
    #: the command-line flag, when it is not --<key with '-'>
    flag_name: str = ""
    #: the config schema's description (else ``help``)
    config_help: str = ""
    #: the config value's JSON schema when its kind alone says too little (ranges)
    schema: Mapping[str, Any] | None = None
    #: the command line's value type when ``kind`` alone says too little (a range)
    parse: Callable[[str], Any] | None = None

    @property
    def flag(self) -> str:
        return self.flag_name or "--" + self.key.replace("_", "-")

    @property
    def is_path(self) -> bool:
        return self.kind is Path

    def is_default(self, value: Any) -> bool:
        return value == self.default

    @property
    def value_type(self) -> Callable[[str], Any]:
        """The command line's type of the value: ``parse``, else ``kind`` (a float: finite)."""
        return self.parse or (finite_float if self.kind is float else self.kind)


INPUT = Option(
    "input",
    "the raw data",
    Path,
    required=True,
    config_help="raw training data (file or folder)",
)
TEST_INPUT = Option(
    "test_input",
    "the test data, when it is not found from --input",
    Path,
    config_help="raw test data when it is not found from `input` (e.g. ILSVRC2012_img_val.tar)",
)
TEST_LABELS = Option(
    "test_labels",
    "labels of a flat test folder: LOC_val_solution.csv (ImageId,PredictionString; class = first token), lines "
    "'file class' separated by commas, tabs or spaces (file names may omit the extension), or the ILSVRC2012 devkit "
    "(ILSVRC2012_devkit_t12.tar.gz, its extracted folder or that folder's data/: the validation ground truth, its "
    "ids turned into WordNet ids by meta.mat)",
    Path,
    config_help="labels of a flat test folder/tar (ImageNet LOC_val_solution.csv, the ILSVRC2012 devkit "
    "ILSVRC2012_devkit_t12.tar.gz or its extracted folder, or 'file class' lines)",
)
SYNSETS = Option(
    "synsets",
    "class names",
    Path,
    config_help="class list naming the classes (ImageNet LOC_synset_mapping.txt); for Downsampled ImageNet the "
    "devkit (ILSVRC2012_devkit_t12.tar.gz or its folder), its meta.mat or map_clsloc.txt (devkit ids -> sorted wnids)",
)
OUT_DIR = Option(
    "out_dir", "output folder for train.h5, test.h5 and prepare_report.txt", Path, common=True, config=False, required=True
)
NAME = Option(
    "name",
    "dataset name stored in the files; when not given, the source's name (for folder: the input's name)",
    common=True,
    config=False,
)
#: the sides S a prepared split may have (both the command line and the config schema)
RESOLUTION_RANGE: tuple[int, int] = (4, 1024)
RESOLUTION = Option(
    "resolution",
    f"output side S in pixels (S x S images, S in {RESOLUTION_RANGE[0]}-{RESOLUTION_RANGE[1]}); when not given",
    int,
    common=True,
    config_help=f"square side in pixels ({RESOLUTION_RANGE[0]}-{RESOLUTION_RANGE[1]}) images are resized to at prepare "
    "time (null = the source's own)",
    schema={"anyOf": [{"type": "integer", "minimum": RESOLUTION_RANGE[0], "maximum": RESOLUTION_RANGE[1]}, {"type": "null"}]},
    parse=int_in_range(*RESOLUTION_RANGE),
)
RESIZE = Option(
    "resize",
    "box: the whole image box-filtered to S x S, aspect ratio not kept (the Downsampled-ImageNet rule); "
    "center-crop: the centred square of side min(w, h) box-filtered to S x S",
    default="box",
    choices=RESIZE_RULES,
    common=True,
    config_help="box = whole image box-filtered to the resolution; center-crop = the centred square",
)
RESIZE_FILTER = Option(
    "resize_filter",
    "resampling filter of the resize (Pillow, antialiased); box is the Downsampled-ImageNet filter, the others "
    "are offered for comparison and recorded in the file's resize_rule attribute",
    default="box",
    choices=tuple(RESIZE_FILTERS),
    common=True,
    config_help="resampling filter of the resize (box = the Downsampled-ImageNet filter)",
)
CHANNELS = Option(
    "channels",
    "3 = convert to RGB, 1 = convert to greyscale (L); when not given, 3",
    int,
    choices=(1, 3),
    config_help="3 = RGB, 1 = greyscale (null = RGB)",
)
FULL_DECODE = Option(
    "full_decode",
    "always decode JPEGs at full size; without it, large JPEGs are decoded at a reduced size that keeps the "
    "shorter side >= max(256, 4 S) (measured within 0.1 grey level of full decoding on ImageNet)",
    bool,
    default=False,
    common=True,
    config_help="decode every JPEG at full size (else large JPEGs are decoded at a reduced size that keeps the shorter "
    "side >= max(256, 4 S))",
)
#: decoding processes: 0 = every available core; each worker takes 6 MiB of shared memory
WORKERS_RANGE: tuple[int, int] = (0, 1024)
WORKERS = Option("workers", f"decoding processes (0 = all available cores; at most {WORKERS_RANGE[1]})", int, default=0,
                 common=True, config=False, parse=int_in_range(*WORKERS_RANGE))
STRICT = Option(
    "strict",
    "stop at the first undecodable image instead of skipping it",
    bool,
    default=False,
    common=True,
    config_help="prepare fails on the first undecodable image instead of skipping and listing it",
)
IGNORE_NON_IMAGES = Option(
    "ignore_non_images",
    "skip files whose extension is not an image's (listed in the report) instead of stopping with an error",
    bool,
    default=False,
    config_help="skip files that are not images (e.g. Tiny ImageNet's <wnid>_boxes.txt), listing them in the "
    "report, instead of stopping with an error",
)
TEST_FRACTION = Option(
    "test_fraction",
    "without any test input: hold out this fraction of every class as the test split",
    float,
    config_help="hold out this fraction of the training images as the test split (only when the data has none)",
    schema={"anyOf": [{"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}, {"type": "null"}]},
)
TEST_FRACTION_SEED = Option(
    "test_fraction_seed",
    "seed of the --test-fraction hold-out",
    int,
    default=0,
    flag_name="--seed",
    config_help="seed of the `test_fraction` hold-out",
    schema={"type": "integer", "minimum": 0},
)
DOWNLOAD = Option(
    "download",
    "fetch the official files into --input with torchvision first (needs a network; fails with instructions "
    "when offline)",
    bool,
    default=False,
    config_help="fetch the official files into `input` with torchvision first (needs a network)",
)
IMAGE_COLUMN = Option(
    "image_column",
    "parquet: column of encoded images (bytes, or a struct with 'bytes' and 'path')",
    default="image",
    config_help="parquet shards: the encoded-image column (raw bytes, or a struct with bytes and path)",
)
LABEL_COLUMN = Option(
    "label_column",
    "parquet: column of integer class labels (0..K-1)",
    default="label",
    config_help="parquet shards: the integer class column",
)
#: the values of --validation-per-class and --validation-seed (the config schema's ranges too)
VALIDATION_PER_CLASS_RANGE = (0, 1_000_000)
VALIDATION_SEED_RANGE = (0, 2**31 - 1)
VALIDATION_PER_CLASS = Option(
    "validation_per_class",
    "hold out this many images of every class of the training split as a validation split, written as val.h5 and "
    "left out of train.h5 (0: none); chosen per class by a permutation from --validation-seed (docs/selection.md)",
    int,
    default=0,
    common=True,
    config_help="images of every training class held out as a validation split (resources/<name>/val.h5), never "
    "seen by the experts or distillation; used to select a kept synthetic set (distill rows with select: "
    "validation); 0 = none",
    schema={"type": "integer", "minimum": VALIDATION_PER_CLASS_RANGE[0], "maximum": VALIDATION_PER_CLASS_RANGE[1]},
    parse=int_in_range(*VALIDATION_PER_CLASS_RANGE),
)
VALIDATION_SEED = Option(
    "validation_seed",
    "seed of the --validation-per-class hold-out",
    int,
    default=0,
    common=True,
    config_help="seed of the `validation_per_class` hold-out",
    schema={"type": "integer", "minimum": VALIDATION_SEED_RANGE[0], "maximum": VALIDATION_SEED_RANGE[1]},
    parse=int_in_range(*VALIDATION_SEED_RANGE),
)
QUIET = Option("quiet", "no progress bars", bool, default=False, common=True, config=False)

#: every option of the catalog, in the order of ``tesla prepare --help``
CATALOG: tuple[Option, ...] = (
    INPUT,
    TEST_INPUT,
    TEST_LABELS,
    SYNSETS,
    OUT_DIR,
    NAME,
    RESOLUTION,
    RESIZE,
    RESIZE_FILTER,
    CHANNELS,
    FULL_DECODE,
    WORKERS,
    STRICT,
    IGNORE_NON_IMAGES,
    TEST_FRACTION,
    TEST_FRACTION_SEED,
    DOWNLOAD,
    IMAGE_COLUMN,
    LABEL_COLUMN,
    VALIDATION_PER_CLASS,
    VALIDATION_SEED,
    QUIET,
)

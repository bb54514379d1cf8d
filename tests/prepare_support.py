"""Helpers shared by the `tesla prepare` tests: the command, small images and the raw files
of each source (idx, CIFAR pickles, Downsampled-ImageNet batches, parquet shards), and the
ImageNet-sample fixture's builder (the fixture itself, ``sample``, is in conftest.py)."""

from __future__ import annotations

import gzip
import json
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from tesla.cli import main

def prepare(*argv) -> int:
    return main(["prepare", *[str(a) for a in argv], "--quiet"])


def jpeg(path: Path, img: Image.Image, fmt: str = "JPEG", **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **kw)
    return path


def pattern(seed: int, w: int = 48, h: int = 40) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_set(folder: Path, n_train=30, n_test=10, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        for kind, arr, magic in (("images-idx3", images, 2051), ("labels-idx1", labels, 2049)):
            raw = idx_bytes(arr, magic)
            name = f"{prefix}-{kind}-ubyte"
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
            else:
                (folder / name).write_bytes(raw)
        data[prefix] = (images, labels)
    return data


def cifar_batch(n: int, num_classes: int, labels_key: bytes, seed: int) -> tuple[dict, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    hwc = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, num_classes, n)
    labels[:num_classes] = np.arange(num_classes)  # every class present
    data = hwc.transpose(0, 3, 1, 2).reshape(n, 3072)  # official channel-planar rows
    return {b"batch_label": b"x", labels_key: labels.tolist(), b"data": data}, hwc, labels


def write_cifar10(folder: Path, per_batch=12) -> tuple[np.ndarray, np.ndarray]:
    d = folder / "cifar-10-batches-py"
    d.mkdir(parents=True)
    names = [n.encode() for n in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")]
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": names, b"num_vis": 3072}))
    all_x, all_y = [], []
    for i in range(1, 6):
        batch, x, y = cifar_batch(per_batch, 10, b"labels", i)
        (d / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
        all_x.append(x)
        all_y.append(y)
    batch, _, _ = cifar_batch(10, 10, b"labels", 99)
    (d / "test_batch").write_bytes(pickle.dumps(batch))
    return np.concatenate(all_x), np.concatenate(all_y)


NUM_CLASSES = 10



def box(path: Path, size: int) -> np.ndarray:
    """A plain Pillow box resize of the fully decoded image (the Downsampled-ImageNet rule)."""
    return np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.Resampling.BOX))


def planar(pixels: np.ndarray) -> np.ndarray:
    """N x S x S x 3 -> N x 3 S S channel-planar rows (all red, then green, then blue)."""
    return pixels.transpose(0, 3, 1, 2).reshape(len(pixels), -1)


def write_pickle(path: Path, data: np.ndarray, labels, mean: bool = True) -> None:
    obj = {"data": data, "labels": [int(v) for v in labels]}
    if mean:
        obj["mean"] = data.mean(axis=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def interleaved(per_class: list[list], rng: np.random.Generator) -> list:
    """Rows in rounds (image k of every class, classes shuffled within a round): the order
    within each class is kept, classes are mixed."""
    rows = []
    for k in range(max(len(v) for v in per_class)):
        for c in rng.permutation(len(per_class)):
            if k < len(per_class[c]):
                rows.append(per_class[c][k])
    return rows


def build_imagenet_sample(src: Path, root: Path) -> dict:
    """NUM_CLASSES classes of the shared ImageNet sample (``src``: its train/ folder), in ``root`` as a class-folder tree (train: the
    sample JPEG and a mirrored re-encode, val: a rotated re-encode), the same images as
    Downsampled-ImageNet batches at 16 px in devkit id order, map_clsloc.txt and meta.mat."""
    root.mkdir(parents=True, exist_ok=True)
    wnids = sorted(p.name for p in src.iterdir())[:NUM_CLASSES]
    rng = np.random.default_rng(5)
    devkit = {w: int(i) + 1 for w, i in zip(wnids, rng.choice(1000, NUM_CLASSES, replace=False))}
    train, val = [], []
    for w in wnids:
        f = next((src / w).iterdir())
        (root / "tree/train" / w).mkdir(parents=True)
        (root / "tree/val" / w).mkdir(parents=True)
        shutil.copy(f, root / "tree/train" / w / f.name)
        img = Image.open(f).convert("RGB")
        img.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(root / "tree/train" / w / f"{w}_zz.JPEG", quality=90)
        img.rotate(90, expand=True).save(root / "tree/val" / w / f"{w}_val.JPEG", quality=85)
        train.append([(p, devkit[w]) for p in sorted((root / "tree/train" / w).iterdir())])
        val.append([(next((root / "tree/val" / w).iterdir()), devkit[w])])
    size = 16
    rows = interleaved(train, rng)
    data = planar(np.stack([box(p, size) for p, _ in rows]))
    labels = np.array([d for _, d in rows])
    half = len(rows) // 2  # two batches: images of one class in both, in order
    write_pickle(root / "pickle/train_data_batch_1", data[:half], labels[:half])
    write_pickle(root / "pickle/train_data_batch_2", data[half:], labels[half:])
    vrows = interleaved(val, rng)
    vdata, vlabels = planar(np.stack([box(p, size) for p, _ in vrows])), np.array([d for _, d in vrows])
    write_pickle(root / "pickle/val_data", vdata, vlabels, mean=False)
    (root / "npz/Imagenet16_train_npz").mkdir(parents=True)
    (root / "npz/Imagenet16_val_npz").mkdir(parents=True)
    np.savez(root / "npz/Imagenet16_train_npz/train_data_batch_1.npz", data=data[:half], labels=labels[:half], mean=data.mean(0))
    np.savez(root / "npz/Imagenet16_train_npz/train_data_batch_2.npz", data=data[half:], labels=labels[half:], mean=data.mean(0))
    np.savez(root / "npz/Imagenet16_val_npz/val_data.npz", data=vdata, labels=vlabels)
    # map_clsloc.txt: 'wnid id name' in devkit id order (not sorted wnids)
    lines = sorted((devkit[w], f"{w} {devkit[w]} name_of_{w}") for w in wnids)
    (root / "map_clsloc.txt").write_text("".join(line + "\n" for _, line in lines))
    from scipy.io import savemat

    syn = np.zeros(NUM_CLASSES + 1, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")])
    for i, w in enumerate(wnids):
        syn[i] = (devkit[w], w, f"name_of_{w}", 0)
    syn[NUM_CLASSES] = (1001, "n00000001", "an inner node", 3)  # not a leaf class: ignored
    savemat(root / "meta.mat", {"synsets": syn})
    return dict(root=root, wnids=wnids, devkit=devkit, size=size)


def write_shard(path: Path, rows: list[tuple[bytes, str, int]], layout: str, names: list[str] | None, row_group_size: int = 3) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = pa.array([r[2] for r in rows], pa.int64())
    if layout == "struct":  # Hugging Face `datasets` Image feature: {bytes, path}
        image = pa.array([{"bytes": r[0], "path": r[1]} for r in rows], pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
        table = pa.table({"image": image, "label": labels})
    else:
        table = pa.table({"img": pa.array([r[0] for r in rows], pa.binary()), "y": labels})
    if names is not None:
        meta = {"info": {"features": {"image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}}}
        table = table.replace_schema_metadata({b"huggingface": json.dumps(meta).encode()})
    pq.write_table(table, path, row_group_size=row_group_size)


#: the fields of the devkit's meta.mat struct array ``synsets``, in its order
DEVKIT_FIELDS = ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "wordnet_height", "num_train_images")


def write_devkit(root: Path, leaves: dict[str, int], truth: list[int], inner: int = 2) -> dict[str, Path]:
    """An ILSVRC2012 devkit in ``root``: the extracted folder ``ILSVRC2012_devkit_t12/`` and the
    tar ``ILSVRC2012_devkit_t12.tar.gz`` of it, as distributed. ``leaves``: WordNet id -> ILSVRC2012
    id of the classes; ``inner`` internal synsets (ids 1001.., with children) follow them, as in
    the official meta.mat (an N x 1 struct array of doubles and strings); ``truth``: the ground
    truth, line i the id of ILSVRC2012_val_<i>."""
    from scipy.io import savemat

    top = root / "ILSVRC2012_devkit_t12"
    (top / "data").mkdir(parents=True)
    (top / "evaluation").mkdir()
    syn = np.zeros((len(leaves) + inner, 1), dtype=[(f, "O") for f in DEVKIT_FIELDS])
    for k, (wnid, ident) in enumerate(leaves.items()):
        syn[k, 0] = (float(ident), wnid, f"words of {wnid}", f"gloss of {wnid}", 0.0, 0.0, 1300.0)
    for j in range(inner):
        syn[len(leaves) + j, 0] = (1001.0 + j, f"n0000{j:04d}", "an internal node", "", 2.0, 1.0 + j, 2600.0)
    savemat(top / "data/meta.mat", {"synsets": syn})
    (top / "data/ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{i}\n" for i in truth))
    (top / "data/ILSVRC2012_validation_blacklisted_det.txt").write_text("1\n")
    (top / "evaluation/demo_eval.m").write_text("% evaluation demo\n")
    (top / "readme.txt").write_text("ILSVRC2012 development kit\n")
    (top / "COPYING").write_text("licence\n")
    with tarfile.open(root / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
        tar.add(top, arcname=top.name)
    return {"tar": root / "ILSVRC2012_devkit_t12.tar.gz", "folder": top, "data": top / "data"}

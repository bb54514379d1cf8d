"""Data files from elsewhere cannot run code: the restricted unpickler of tesla.data.safe_pickle.

Crafted CIFAR and Downsampled-ImageNet batches (an extra dict entry whose ``__reduce__`` calls
``os.system``, ``subprocess.Popen``, ``builtins.eval`` or ``posix.system``) are refused by
``tesla prepare`` with exit status 2 and one line naming file, member and global; the payload
does not run and nothing is written. Batches in the official structure, pickled the way
Python 2 wrote the CIFAR files, and by NumPy 1.x/2.x under Python 3 with protocols 0-5, read
exactly as Python's own unpickler reads them. An ``ast`` scan keeps every other way of
unpickling out of the package.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import io
import os
import pickle
import posix
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from prepare_support import cifar_batch, prepare, write_cifar10, write_pickle
from tesla.data import ImageSplit
from tesla.data.safe_pickle import ALLOWED_GLOBALS, load_official
from tesla.data.sources.downsampled import load_batch
from tesla.errors import TeslaError

PACKAGE = Path(__file__).resolve().parents[1] / "tesla"


# -- crafted files --------------------------------------------------------------------------


class _Payload:
    """An object that, unpickled by Python's own unpickler, calls ``call(*args)``."""

    def __init__(self, call, args) -> None:
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def _payload(kind: str, marker: Path) -> tuple[_Payload, str]:
    """(the object, the global its pickle names) for each attack; each would create ``marker``."""
    shell = f"touch '{marker}'"
    if kind == "os.system":
        return _Payload(posix.system, (shell,)), "os.system"  # written as os.system below
    if kind == "posix.system":
        return _Payload(posix.system, (shell,)), "posix.system"
    if kind == "subprocess.Popen":
        return _Payload(subprocess.Popen, (["touch", str(marker)],)), "commands.Popen (Python 3: subprocess.Popen)"
    if kind == "builtins.eval":
        return _Payload(builtins.eval, (f"open({str(marker)!r}, 'w').close()",)), "__builtin__.eval (Python 3: builtins.eval)"
    raise AssertionError(kind)


def _crafted(batch: dict, kind: str, marker: Path) -> tuple[bytes, str]:
    """``batch`` with one extra entry holding the payload, pickled (protocol 2 like the
    official files), and the refused name the error must give."""
    payload, refused = _payload(kind, marker)
    raw = pickle.dumps({**batch, b"x": payload}, protocol=2)
    if kind == "os.system":  # the name an attacker may write by hand; os.system pickles as posix.system
        raw = raw.replace(b"cposix\nsystem\n", b"cos\nsystem\n")
        assert b"cos\nsystem\n" in raw
    return raw, refused


ATTACKS = ["os.system", "subprocess.Popen", "builtins.eval", "posix.system"]


def _tar_gz(folder: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive


@pytest.mark.parametrize("kind", ATTACKS)
def test_crafted_cifar10_archive_is_refused_without_running_or_writing(tmp_path, capsys, kind):
    write_cifar10(tmp_path / "in")
    folder = tmp_path / "in/cifar-10-batches-py"
    marker = tmp_path / "marker"
    batch, _, _ = cifar_batch(12, 10, b"labels", 1)
    raw, refused = _crafted(batch, kind, marker)
    (folder / "data_batch_1").write_bytes(raw)
    archive = _tar_gz(folder, tmp_path / "cifar-10-python.tar.gz")
    out = tmp_path / "out"
    assert prepare("cifar10", "--input", archive, "--out-dir", out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"{archive}, member cifar-10-batches-py/data_batch_1" in err
    assert f"global {refused}: " in err and "not an official CIFAR batch" in err
    assert not marker.exists(), "the payload ran"
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.parametrize("batch_name", ["val_data", "train_data_batch_2"])
@pytest.mark.parametrize("kind", ATTACKS)
def test_crafted_downsampled_batch_is_refused_without_running_or_writing(tmp_path, capsys, kind, batch_name):
    rng = np.random.default_rng(0)
    folder, marker, out = tmp_path / "in", tmp_path / "marker", tmp_path / "out"
    data, labels = rng.integers(0, 256, (20, 3 * 8 * 8), dtype=np.uint8), np.arange(20) % 10 + 1
    for name in ("train_data_batch_1", "train_data_batch_2", "val_data"):
        write_pickle(folder / name, data, labels)
    raw, refused = _crafted({"data": data, "labels": labels.tolist()}, kind, marker)
    (folder / batch_name).write_bytes(raw)
    (tmp_path / "map.txt").write_text("".join(f"n{i:08d} {i} c{i}\n" for i in range(1, 11)))
    assert prepare("imagenet-downsampled", "--input", folder, "--synsets", tmp_path / "map.txt", "--out-dir", out, "--workers", 1) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"{folder / batch_name}: " in err and f"global {refused}: " in err and "not an official Downsampled-ImageNet batch" in err
    assert not marker.exists(), "the payload ran"
    assert not out.exists() or list(out.iterdir()) == []  # no train.h5/test.h5, no staging files


def test_download_reads_the_fetched_batches_with_the_restricted_unpickler(tmp_path, capsys, monkeypatch):
    """--download: torchvision only fetches and extracts (its dataset class, which would
    unpickle the batches with pickle.load, is not built); the batches then go through our reader."""
    from torchvision.datasets import utils

    marker, fetched = tmp_path / "marker", []

    def fake_download(url, root, filename=None, md5=None):  # a mirror serving a crafted archive
        fetched.append((url, filename, md5))
        write_cifar10(Path(root))
        raw, _ = _crafted(cifar_batch(12, 10, b"labels", 1)[0], "subprocess.Popen", marker)
        (Path(root) / "cifar-10-batches-py/data_batch_1").write_bytes(raw)

    monkeypatch.setattr(utils, "download_and_extract_archive", fake_download)
    monkeypatch.setattr(pickle, "load", None)  # torchvision's CIFAR10 reads with pickle.load
    assert prepare("cifar10", "--input", tmp_path / "raw", "--out-dir", tmp_path / "out", "--download") == 2
    err = capsys.readouterr().err
    assert fetched == [("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a")]
    assert "data_batch_1: refuses to load the Python global commands.Popen (Python 3: subprocess.Popen)" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


# -- what is refused besides ------------------------------------------------------------------


class Plain:
    """A plain class: protocols 0-1 pickle its instances through copyreg._reconstructor."""


def _refused_name(raw: bytes) -> str:
    with pytest.raises(TeslaError) as err:
        load_official(raw, file="f", member=None, what="CIFAR", encoding="bytes")
    return str(err.value).split("global ")[1].split(": this file")[0]


def test_copyreg_reconstructor_numpy_scalars_and_classes_are_refused():
    plain = Plain()
    assert _refused_name(pickle.dumps({"x": plain}, protocol=0)) == "copy_reg._reconstructor (Python 3: copyreg._reconstructor)"
    assert _refused_name(pickle.dumps({"x": plain}, protocol=3)) == f"{__name__}.Plain"  # protocols 2+: the class itself
    # even with arguments that are allowed globals themselves: copyreg stays refused
    harmless = b"\x80\x02ccopyreg\n_reconstructor\ncnumpy\nndarray\nc__builtin__\nobject\nN\x87R."
    assert _refused_name(harmless) == "copyreg._reconstructor"
    assert _refused_name(pickle.dumps(np.int64(3), protocol=2)).endswith(".scalar")
    assert _refused_name(pickle.dumps({"x": Plain}, protocol=4)) == f"{__name__}.Plain"


def test_codecs_encode_turns_only_latin1_text_into_bytes():
    """``_codecs.encode`` is allowed because Python 3 writes bytes under protocols 0-2 as
    ``_codecs.encode(text, 'latin1')``; any other codec is refused."""
    assert load_official(pickle.dumps(b"\x00\xff", protocol=2), file="f", member=None, what="x", encoding="bytes") == b"\x00\xff"
    zlib = b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\n\x00\x00\x00zlib_codec\x86R."
    with pytest.raises(pickle.UnpicklingError, match="only 'latin1'"):
        load_official(zlib, file="f", member=None, what="x", encoding="bytes")


# -- the official structure reads exactly as before --------------------------------------------


class Python2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2 wrote its ``str`` (SHORT_BINSTRING/BINSTRING), the
    form of the official CIFAR batches (cPickle, protocol 2)."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj) -> None:
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str


@contextlib.contextmanager
def numpy_module_paths(core: str):
    """Make this NumPy pickle arrays under ``core`` (``numpy.core``, as NumPy 1.x does, or
    ``numpy._core``, as NumPy 2.x does); skip where this NumPy cannot import that path."""
    reconstruct, frombuffer = np.zeros(1).__reduce_ex__(2)[0], np.zeros(1).__reduce_ex__(5)[0]
    saved = reconstruct.__module__, frombuffer.__module__
    try:
        __import__(f"{core}.multiarray")
        __import__(f"{core}.numeric")
    except ImportError:
        pytest.skip(f"NumPy {np.__version__} has no {core} to pickle under")
    reconstruct.__module__, frombuffer.__module__ = f"{core}.multiarray", f"{core}.numeric"
    try:
        yield
    finally:
        reconstruct.__module__, frombuffer.__module__ = saved


def _globals_of(raw: bytes) -> set[str]:
    seen: set[str] = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            seen.add(f"{module}.{name}")
            return super().find_class(module, name)

    Recorder(io.BytesIO(raw), encoding="bytes").load()
    return seen


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and a == b


def _official_batches(rng: np.random.Generator) -> list[dict]:
    """A CIFAR batch and Downsampled-ImageNet batches of every published resolution (8-64 px)."""
    cifar, _, _ = cifar_batch(10, 10, b"labels", 3)
    cifar.update({b"filenames": [b"a.png"] * 10, b"coarse_labels": list(range(10))})
    batches = [cifar]
    for side in (8, 16, 32, 64):
        data = rng.integers(0, 256, (3, 3 * side * side), dtype=np.uint8)
        batches.append({"data": data, "labels": [1, 500, 1000], "mean": data.mean(0)})
    return batches


@pytest.mark.filterwarnings("ignore:numpy.core:DeprecationWarning")  # pickle's own reading of numpy.core paths
@pytest.mark.parametrize("core", ["numpy.core", "numpy._core"])
@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_batches_of_every_protocol_read_exactly_as_pickle_reads_them(core, protocol):
    allowed = {f"{m}.{n}" for m, n in ALLOWED_GLOBALS}
    for batch in _official_batches(np.random.default_rng(protocol)):
        with numpy_module_paths(core):
            raw = pickle.dumps(batch, protocol=protocol)
        assert _globals_of(raw) <= allowed
        for encoding in ("bytes", "latin1"):
            ours = load_official(raw, file="f", member=None, what="x", encoding=encoding)
            assert _same(ours, pickle.loads(raw, encoding=encoding)) and _same(ours, batch)


@pytest.mark.filterwarnings("ignore:numpy.core:DeprecationWarning")
def test_python2_style_cifar_batches_read_pixel_exactly(tmp_path):
    """The official files' form: Python 2 strings, protocol 2, numpy.core.multiarray; their
    only globals are those of the official data_batch_1 (pickletools.dis)."""
    folder = tmp_path / "cifar-10-batches-py"
    x, y = write_cifar10(tmp_path)
    with numpy_module_paths("numpy.core"):
        for path in sorted(folder.iterdir()):
            out = io.BytesIO()
            Python2Pickler(out, protocol=2).dump(pickle.loads(path.read_bytes()))
            path.write_bytes(out.getvalue())
    raw = (folder / "data_batch_1").read_bytes()
    assert b"U\x04data" in raw and b"T\x00\x90\x00\x00" in raw  # Python 2 str keys; 12 x 3072 pixels as one str
    assert _globals_of(raw) == {"numpy.core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype"}
    assert _same(load_official(raw, file="f", member=None, what="x", encoding="bytes"), pickle.loads(raw, encoding="bytes"))
    assert prepare("cifar10", "--input", _tar_gz(folder, tmp_path / "c.tar.gz"), "--out-dir", tmp_path / "out") == 0
    train = ImageSplit.open(tmp_path / "out/train.h5")
    assert np.array_equal(train.images_uint8(), x[np.argsort(y, kind="stable")])


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_downsampled_batches_of_each_resolution_read_pixel_exactly(tmp_path, protocol):
    for i, batch in enumerate(_official_batches(np.random.default_rng(9))[1:]):
        path = tmp_path / f"train_data_batch_{i + 1}"
        path.write_bytes(pickle.dumps(batch, protocol=protocol))
        data, labels = load_batch(path)
        assert np.array_equal(data, batch["data"]) and labels.tolist() == batch["labels"]


@pytest.mark.filterwarnings("ignore:numpy.core:DeprecationWarning")
def test_real_cifar10_python_batches_when_present():
    """The official data_batch_1, where TESLA_DATASETS holds it (as cifar-10-batches-py/ or
    the .tar.gz, at the top or one folder down): its globals are the three allowed ones."""
    root = Path(os.environ.get("TESLA_DATASETS", "/nonexistent"))
    names = ("cifar-10-batches-py/data_batch_1", "cifar-10-python.tar.gz")
    found = [p for name in names for p in [root / name, *sorted(root.glob(f"*/{name}"))] if p.is_file()]
    if not found:
        pytest.skip(f"no {' or '.join(names)} under TESLA_DATASETS ({root})")
    path = found[0]
    if path.name == "data_batch_1":
        raw = path.read_bytes()
    else:
        with tarfile.open(path) as tar:
            raw = tar.extractfile("cifar-10-batches-py/data_batch_1").read()
    assert _globals_of(raw) == {"numpy.core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype"}
    ours = load_official(raw, file=str(path), member=None, what="CIFAR", encoding="bytes")
    assert _same(ours, pickle.loads(raw, encoding="bytes")) and ours[b"data"].shape == (10000, 3072)


# -- no other way to unpickle in the package ---------------------------------------------------

PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
UNPICKLING = {"load", "loads", "Unpickler", "_Unpickler", "open"}
READER = PACKAGE / "data/safe_pickle.py"


def _keyword(call: ast.Call, name: str):
    """The constant given as keyword ``name``, "absent", or "not a constant"."""
    found = [k.value for k in call.keywords if k.arg == name]
    if not found:
        return "absent"
    return found[0].value if isinstance(found[0], ast.Constant) else "not a constant"


def _modules_by_local_name(tree: ast.AST) -> dict[str, str]:
    """``import numpy as np`` -> {"np": "numpy"} (and a plain import maps to itself)."""
    names = {"np": "numpy", "pd": "pandas"}  # the usual names, also when imported elsewhere
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update({a.asname or a.name: a.name for a in node.names})
    return names


def _unsafe_call(module: str, attr: str, node: ast.Call) -> str | None:
    if module == "torch" and attr == "load" and _keyword(node, "weights_only") is not True:
        return "torch.load without weights_only=True"
    if module == "numpy" and attr == "load" and _keyword(node, "allow_pickle") not in (False, "absent"):
        return "np.load with allow_pickle other than False"
    return None


def _unsafe_in(tree: ast.AST, is_reader: bool) -> list[str]:
    """Ways to unpickle outside the rules, by line: pickle-like modules' load/loads/Unpickler
    (the Unpickler base class only in the reader), torch.load without weights_only=True,
    np.load with allow_pickle other than False, pandas' read_pickle; module aliases resolved."""
    modules, bad = _modules_by_local_name(tree), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            module, attr = modules.get(node.value.id, node.value.id), node.attr
            if module in PICKLE_MODULES and attr in UNPICKLING and not (is_reader and attr == "Unpickler"):
                bad.append(f"{node.lineno}: {module}.{attr}")
            if attr == "read_pickle":
                bad.append(f"{node.lineno}: {module}.read_pickle")
        if isinstance(node, ast.ImportFrom) and node.module in PICKLE_MODULES | {"torch", "numpy", "pandas"}:
            names = {a.name for a in node.names} & (UNPICKLING | {"read_pickle"})
            bad += [f"{node.lineno}: from {node.module} import {n}" for n in sorted(names)]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name):
            problem = _unsafe_call(modules.get(node.func.value.id, node.func.value.id), node.func.attr, node)
            bad += [f"{node.lineno}: {problem}"] if problem else []
    return bad


@pytest.mark.parametrize(
    "source",
    [
        "import pickle\npickle.load(f)",
        "import pickle\nx = pickle.loads(b)",
        "from pickle import loads",
        "import pickle\nclass U(pickle.Unpickler):\n    pass",
        "import torch\ntorch.load(p)",
        "import torch\ntorch.load(p, map_location='cpu', weights_only=False)",
        "import numpy as np\nnp.load(p, allow_pickle=True)",
        "import pandas as pd\npd.read_pickle(p)",
        "import dill\ndill.loads(b)",
        "import pickle as pk\npk.Unpickler(f).load()",
        "import torch as t\nt.load(p, weights_only=flag)",
        "import numpy\nnumpy.load(p, allow_pickle=True)",
    ],
)
def test_the_scan_catches_each_way_to_unpickle(source):
    assert _unsafe_in(ast.parse(source), is_reader=False), source


def test_the_package_unpickles_only_through_the_restricted_reader():
    clean = "import torch, numpy as np\ntorch.load(p, weights_only=True)\nnp.load(p, allow_pickle=False)\nnp.load(p)"
    assert _unsafe_in(ast.parse(clean), is_reader=False) == []
    found, paths = {}, sorted(PACKAGE.rglob("*.py"))
    assert READER in paths and len(paths) > 20
    for path in paths:
        bad = _unsafe_in(ast.parse(path.read_text(), str(path)), is_reader=path == READER)
        if bad:
            found[str(path.relative_to(PACKAGE.parent))] = bad
    assert found == {}, found
    reader = ast.parse(READER.read_text())
    unpicklers = [c for c in ast.walk(reader) if isinstance(c, ast.ClassDef) and any(ast.unparse(b) == "pickle.Unpickler" for b in c.bases)]
    assert [c.name for c in unpicklers] == ["BatchUnpickler"]
    assert "find_class" in {f.name for f in unpicklers[0].body if isinstance(f, ast.FunctionDef)}
    assert sys.modules["tesla.data.safe_pickle"].BatchUnpickler.find_class is not pickle.Unpickler.find_class

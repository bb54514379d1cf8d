"""What one workflow target costs, stage by stage, from measured rates.

    python bench/project_cost.py --rates bench/rates_h100_today.yaml                 # results/in1k_ipc50/acc.csv
    python bench/project_cost.py --rates R.yaml --dataset cifar10 --ipc 10 --train-images 50000 --test-images 10000
    python bench/project_cost.py rates --engine DIR/engine_in1k_ipc50.md --training DIR/convnet_d4_float32.md \\
        DIR/models_64px.md --base bench/rates_h100_today.yaml --machine "H200, 2026-12-01" --out bench/rates_h200.yaml
    python bench/project_cost.py --rates bench/rates_h100_today.yaml --gpus 1 2 4 8   # the distillation over G GPUs

With ``--gpus``, the table is the distillation's wall time over G GPUs (:func:`scale_distill`):
each rank runs 1/G of every student step (the single-GPU rate), and every iteration all-reduces
what :mod:`tesla.distributed` sums (N parameter vectors in the forward sweep, N more in the reverse
sweep of ``exact``, the touched rows of the image gradient, the soft labels), by a ring over
NVLink within a node and over InfiniBand across nodes, at the bandwidths and latencies of
:data:`LINKS` (stated assumptions, named in the table), plus the work every rank repeats (the
SGD step on the replicated images, at HBM bandwidth).

The work of each stage comes from the dataset's entry of ``config/config.yaml`` (read as the
workflow reads it): experts count x the epochs they actually train (``keep_snapshots: auto``: the
largest max_start_epoch + expert_epochs of the rows sharing their input space, capped by
``epochs``; all epochs with ``train_to_end``) x the training images; distillation iterations x
syn_steps x batch_syn (all IPC x classes images when null) per engine, plus one forward pass over
the synthetic set per iteration for soft labels; evaluation architectures x runs x epochs x the
IPC x classes images, for every engine's set and the random-real baseline, plus one test pass per
run. Dividing by a rate gives seconds; the table is in hours (prepare in CPU-hours, the rest in
GPU-hours of the rates file's GPU).

Rates file (YAML, ``format: tesla-rates``, ``format_version: 1``): ``machine`` (words) and
``rates``, a mapping name -> {``value``, ``unit``, ``source``, ``assumed``}; ``assumed: true``
marks a value that was not measured (its ``source`` says how it was chosen), and the table flags
every figure that depends on one. Names (``ARCH`` is a registry name, e.g. ``convnet_d4``):

| name | unit | meaning |
|---|---|---|
| ``prepare_images_per_cpu_second`` | images / CPU-s | ``tesla prepare`` decoding + resizing, all processes' CPU time |
| ``train_images_per_second.ARCH`` | images / s | one training run of ARCH at the dataset's resolution (``tesla.training.train``, DSA on): experts and evaluation runs |
| ``forward_images_per_second.ARCH`` | images / s | inference of ARCH (soft labels, test passes) |
| ``student_step_image_seconds.ARCH`` | s / (student step x image) | one distillation iteration = syn_steps x batch_syn x this (both passes of ``exact``/``tesla``) |

A rate the target needs and the file lacks is refused with its name and where it comes from.
``rates`` converts the outputs of ``bench/gpu_benchmarks.sh engine`` (its ``engine_*.md``: the
fastest column other than ``before`` and ``floor``, seconds per iteration / (N x batch_syn)) and
``training`` (its ``*_float32.md`` / ``*_bf16.md`` / ``models_64px.md`` matrix tables: the fastest configuration's
images/s of all the networks of its group, which is what a group of experts or of evaluation runs
achieves) into such a file, keeping the other rates of ``--base`` (their source says "carried
over from").
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tesla.errors import TeslaError  # noqa: E402
from tesla.registries import last_snapshot_needed, soft_label_kind  # noqa: E402

RATES_FORMAT, RATES_VERSION = "tesla-rates", 1
# ImageNet-1K (ILSVRC2012): training and validation images.
IN1K_TRAIN, IN1K_TEST = 1_281_167, 50_000


@dataclass
class Stage:
    """One line of the projection: a stage's work, the rates it used, its hours."""

    name: str
    work: str
    hours: float
    unit: str
    rates: list[str]
    assumed: list[str]


class Rates:
    """A rates file: look-ups that name the missing rate and who needs it."""

    def __init__(self, path: Path):
        self.path = path
        try:
            doc = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise TeslaError(f"rates file {path}: cannot read it ({exc})") from exc
        if not isinstance(doc, dict) or doc.get("format") != RATES_FORMAT or doc.get("format_version") != RATES_VERSION:
            raise TeslaError(f"rates file {path}: not a {RATES_FORMAT} version {RATES_VERSION} file (its first keys must be "
                             f"'format: {RATES_FORMAT}' and 'format_version: {RATES_VERSION}')")
        self.machine = str(doc.get("machine", "?"))
        self.rates: dict[str, dict] = doc.get("rates") or {}
        for name, r in self.rates.items():
            if not isinstance(r, dict) or not isinstance(r.get("value"), (int, float)) or r["value"] <= 0 or "source" not in r:
                raise TeslaError(f"rates file {path}: rate '{name}' needs a positive 'value' and a 'source' (and 'assumed: true' "
                                 "if it was not measured)")

    def get(self, name: str, needed_by: str) -> tuple[float, bool]:
        """(value, assumed) of rate ``name``; a clear error when the file lacks it."""
        if name not in self.rates:
            raise TeslaError(f"rates file {self.path} has no rate '{name}', which {needed_by} needs: measure it "
                             "(bench/gpu_benchmarks.sh, then `python bench/project_cost.py rates`) or add it with a "
                             "'source' and 'assumed: true'")
        r = self.rates[name]
        return float(r["value"]), bool(r.get("assumed", False))


def expert_epochs_trained(entry: dict, space: tuple) -> int:
    """Epochs the experts of one input space train: ``keep_snapshots`` (``auto``: the last
    snapshot the rows in that space read, ``tesla.registries.last_snapshot_needed``, at most
    ``epochs``), or all ``epochs`` with ``train_to_end`` or ``keep_snapshots: null``."""
    ex = entry["experts"]
    keep = ex.get("keep_snapshots")
    if ex.get("train_to_end") or keep is None:
        return int(ex["epochs"])
    if keep == "auto":
        rows = [r for r in entry["distill"].values() if row_space(entry, r) == space]
        return min(int(ex["epochs"]), max(last_snapshot_needed(r) for r in rows))
    return int(keep)


def row_space(entry: dict, row: dict) -> tuple:
    """The input space of a distill row: (normalisation, ZCA on/off), the row overriding the entry."""
    return (row.get("normalize", entry.get("normalize", "split")), bool(row.get("zca", entry.get("zca", False))))


def project(entry: dict, dataset: str, ipc: int, rates: Rates, train_images: int, test_images: int,
            classes: int, cores: int = 16) -> list[Stage]:
    """The stages of ``results/<dataset>_ipc<ipc>/acc.csv`` with the work counted from ``entry``."""
    if ipc not in entry["distill"]:
        raise TeslaError(f"datasets.{dataset}.distill has no IPC {ipc} (it has {sorted(entry['distill'])})")
    row = entry["distill"][ipc]
    model = entry["model"]
    ex, ev = entry["experts"], entry["evaluate"]
    stages = []

    def rate(name: str, needed_by: str, used: list, assumed: list) -> float:
        value, is_assumed = rates.get(name, needed_by)
        used.append(name)
        if is_assumed:
            assumed.append(name)
        return value

    # prepare: CPU time of decoding every image once
    used, assumed = [], []
    per_cpu_s = rate("prepare_images_per_cpu_second", "prepare", used, assumed)
    n_prep = train_images + test_images
    stages.append(Stage("prepare", f"{n_prep:,} images decoded (wall on {cores} cores: "
                        f"{n_prep / per_cpu_s / cores / 60:.0f} min if it scales)", n_prep / per_cpu_s / 3600, "CPU-hours", used, assumed))

    # experts: count x epochs actually trained x training images (+ a test pass per epoch)
    used, assumed = [], []
    epochs = expert_epochs_trained(entry, row_space(entry, row))
    count = int(ex["count"])
    train = rate(f"train_images_per_second.{model}", f"experts ({model})", used, assumed)
    fwd = rate(f"forward_images_per_second.{model}", f"experts' test passes ({model})", used, assumed)
    seconds = count * epochs * (train_images / train + test_images / fwd)
    stages.append(Stage("experts", f"{count} x {epochs} of {ex['epochs']} epochs x {train_images:,} images (+ a test pass per epoch)",
                        seconds / 3600, "GPU-hours", used, assumed))

    # distill: per engine, iterations x syn_steps x batch_syn student-step images, + soft labels
    used, assumed = [], []
    engines = row.get("engine", ["exact"])
    engines = [engines] if isinstance(engines, str) else list(engines)
    n_syn = ipc * classes
    batch = row.get("batch_syn") or n_syn
    iterations, steps = int(row.get("iterations", 10000)), int(row["syn_steps"])
    step = rate(f"student_step_image_seconds.{model}", f"distill ({model})", used, assumed)
    per_iter = steps * batch * step
    labels = ""
    if soft_label_kind(row.get("soft_labels", "none")) == "tesla":  # relabelled every iteration (learned: once)
        per_iter += n_syn / rate(f"forward_images_per_second.{model}", f"soft labels ({model})", used, assumed)
        labels = f" + soft labels of {n_syn:,} images"
    seconds = len(engines) * iterations * per_iter
    stages.append(Stage("distill", f"{len(engines)} engine(s) ({', '.join(engines)}) x {iterations:,} iterations x {steps} steps x "
                        f"batch {batch:,}{labels} ({per_iter:.2f} s per iteration)", seconds / 3600, "GPU-hours", used, assumed))

    # evaluate: (sets + random baseline) x architectures x runs x epochs x IPC x classes images, + test pass
    used, assumed = [], []
    runs = int(row.get("eval_runs") or ev.get("runs", 5))
    eval_epochs = int(ev.get("epochs", 1000))
    sets = len(engines) + (1 if ev.get("random_baseline", True) else 0)
    seconds, per_arch, per_job = 0.0, [], {}
    for arch in ev["architectures"]:
        t = rate(f"train_images_per_second.{arch}", f"evaluate ({arch})", used, assumed)
        f = rate(f"forward_images_per_second.{arch}", f"evaluate's test pass ({arch})", used, assumed)
        per_job[arch] = runs * (eval_epochs * n_syn / t + test_images / f)  # one job: one set, one architecture
        s = sets * per_job[arch]
        per_arch.append(f"{arch} {s / 3600:.1f} h")
        seconds += s
    longest = max(per_job, key=per_job.get)
    stages.append(Stage("evaluate", f"{sets} sets x {len(ev['architectures'])} architectures x {runs} runs x {eval_epochs} epochs x "
                        f"{n_syn:,} images ({'; '.join(per_arch)}; the longest job: {longest}, "
                        f"{per_job[longest] / 3600:.1f} h)", seconds / 3600, "GPU-hours", used, assumed))
    return stages


#: interconnects (stated, not measured here): NCCL all-reduce bus bandwidth and per-hop latency
LINKS = {
    "nvlink": {"bytes_per_s": 300e9, "hop_s": 5e-6,
               "what": "NVLink 4 within a node (H100 SXM: 450 GB/s per direction; 300 GB/s NCCL bus bandwidth assumed)"},
    "infiniband": {"bytes_per_s": 40e9, "hop_s": 10e-6,
                   "what": "InfiniBand NDR across nodes (400 Gb/s = 50 GB/s, one adapter per GPU; 40 GB/s assumed)"},
}
#: HBM bandwidth for the work every rank repeats (the images' SGD step); H100 SXM: 3.35 TB/s, 2.5 assumed
HBM_BYTES_PER_S = 2.5e12
GPUS_PER_NODE = 8


@dataclass
class Scaling:
    """The distillation's wall time over G GPUs, split into its parts (seconds per iteration)."""

    gpus: int
    nodes: int
    compute: float
    network: float
    repeated: float
    hours: float


def distill_traffic(row: dict, ipc: int, classes: int, params: int, image_floats: int) -> tuple[int, int]:
    """(all-reduces, floats all-reduced) of one iteration of one engine, as tesla.distributed sums:
    N parameter vectors in the forward sweep (and N in the reverse sweep of exact), then the image
    gradient's touched rows (+ K label columns with learned labels) and dL/dalpha in one, and the
    n x K soft labels of the labelling pass with TESLA's labels."""
    n, steps = ipc * classes, int(row["syn_steps"])
    batch = row.get("batch_syn") or n
    engines = row.get("engine", ["exact"])
    exact = "exact" in ([engines] if isinstance(engines, str) else engines)
    kind = soft_label_kind(row.get("soft_labels", "none"))
    touched = min(n, steps * batch)
    calls = steps * (2 if exact else 1) + 1 + (kind == "tesla")
    floats = steps * params * (2 if exact else 1) + touched * (image_floats + (classes if kind == "learned" else 0)) + 1
    return calls, floats + (n * classes if kind == "tesla" else 0)


def scale_distill(entry: dict, ipc: int, rates: Rates, classes: int, gpus: list[int], params: int) -> list[Scaling]:
    """Wall hours of the row's distillation (per engine, as :func:`project` counts it) over G GPUs."""
    single = next(s for s in project(entry, "", ipc, rates, 1, 1, classes) if s.name == "distill")
    row = entry["distill"][ipc]
    engines = row.get("engine", ["exact"])
    runs = len([engines] if isinstance(engines, str) else engines)
    iterations = int(row.get("iterations", 10000)) * runs
    per_iteration = single.hours * 3600 / iterations
    image_floats = 3 * int(entry.get("resolution", 32)) ** 2
    calls, floats = distill_traffic(row, ipc, classes, params, image_floats)
    n = ipc * classes
    repeated = 5 * 4 * n * image_floats / HBM_BYTES_PER_S  # read X, dL/dX, momentum; write X, momentum
    out = []
    for g in gpus:
        nodes = -(-g // GPUS_PER_NODE)
        link = LINKS["nvlink" if nodes == 1 else "infiniband"]
        network = 0.0 if g == 1 else calls * 2 * (g - 1) * link["hop_s"] + 2 * (g - 1) / g * 4 * floats / link["bytes_per_s"]
        seconds = per_iteration / g + network + repeated
        out.append(Scaling(g, nodes, per_iteration / g, network, repeated, seconds * iterations / 3600))
    return out


def render_scaling(rows: list[Scaling], rates: Rates, target: str, traffic: tuple[int, int], params: int) -> str:
    """Markdown table of :func:`scale_distill`, with its assumptions."""
    base = rows[0].hours if rows[0].gpus == 1 else None
    lines = [f"Distillation of `{target}` over G GPUs, from `{rates.path.name}` ({rates.machine})", "",
             "| GPUs | nodes | compute s/it | network s/it | repeated s/it | wall hours | speed-up |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        speed = f"{base / r.hours:.2f}x" if base else "-"
        lines.append(f"| {r.gpus} | {r.nodes} | {r.compute:.3f} | {r.network:.4f} | {r.repeated:.4f} | {r.hours:.2f} | {speed} |")
    calls, floats = traffic
    lines += ["", f"Per iteration: {calls} all-reduces of {floats * 4 / 1e6:,.0f} MB in all (P = {params:,} parameters); "
              "a ring all-reduce sends 2 (G - 1) / G of it per rank and takes 2 (G - 1) hops.", "", "Assumptions: "
              + "; ".join(v["what"] + f", {v['hop_s'] * 1e6:g} us per hop" for v in LINKS.values())
              + f"; {GPUS_PER_NODE} GPUs per node (more than that: every hop at InfiniBand's rate); the single-GPU rate "
              "holds at batch_syn / G images per GPU (not measured: bench/gpu_distributed.sh measures it); no overlap of "
              f"communication and compute; every rank repeats the images' SGD step at {HBM_BYTES_PER_S / 1e12:g} TB/s HBM."]
    return "\n".join(lines) + "\n"


def model_parameters(entry: dict, classes: int) -> int:
    """P of the entry's network at its resolution (builds it: imports torch)."""
    from tesla.models import build_model

    model = build_model(entry["model"], channels=3, num_classes=classes, resolution=int(entry.get("resolution", 32)))
    return sum(p.numel() for p in model.parameters())


def render(stages: list[Stage], rates: Rates, target: str, budget_hours: float | None) -> str:
    """Markdown table of the projection; assumed rates flagged per stage."""
    gpu = sum(s.hours for s in stages if s.unit == "GPU-hours")
    lines = [f"Projection of `{target}` from `{rates.path.name}` ({rates.machine})", "",
             "| stage | work | hours | unit | rates used (* = assumed, not measured) |", "|---|---|---|---|---|"]
    for s in stages:
        names = ", ".join(f"{n}{'*' if n in s.assumed else ''}" for n in dict.fromkeys(s.rates))
        lines.append(f"| {s.name} | {s.work} | {s.hours:.2f} | {s.unit} | {names} |")
    total = f"| **total on the GPU** | experts + distill + evaluate | **{gpu:.1f}** | GPU-hours |"
    if budget_hours:
        total += f" target {budget_hours:g} GPU-hours: {gpu / budget_hours:.1f}x |"
    else:
        total += " |"
    lines.append(total)
    if any(s.assumed for s in stages):
        lines += ["", "Assumed rates: " + "; ".join(f"`{n}` = {rates.rates[n]['value']:g} ({rates.rates[n]['source']})"
                                                   for n in dict.fromkeys(n for s in stages for n in s.assumed))]
    return "\n".join(lines) + "\n"


# ---- converting the GPU parts' outputs into a rates file --------------------------------------

def engine_rate(md: str) -> dict[str, dict]:
    """``student_step_image_seconds.<model>`` from an ``engine_*.md`` of bench_distill.py engine."""
    head = re.search(r"\*\*(\S+)\*\*: (\w+) width \d+, .*?batch_syn (\d+), N = (\d+)", md)
    if not head:
        raise TeslaError("engine table: no '**SETTING**: MODEL width W, ..., batch_syn B, N = N' line (bench_distill.py engine output)")
    setting, model, batch, n = head.group(1), head.group(2), int(head.group(3)), int(head.group(4))
    best = None
    for m in re.finditer(r"^\| (\S+) \| [\d.]+ \| ([\d.]+) \|", md, re.M):
        col, secs = m.group(1), float(m.group(2))
        if col not in ("before", "floor") and (best is None or secs < best[1]):
            best = (col, secs)
    if best is None:
        raise TeslaError(f"engine table {setting}: no timed column other than before/floor")
    return {f"student_step_image_seconds.{model}": {
        "value": best[1] / (n * batch), "unit": "s / (student step x image)", "assumed": False,
        "source": f"bench_distill.py engine --settings {setting}: {best[1]:.4f} s per iteration ({best[0]}) / (N {n} x batch_syn {batch})"}}


def training_rate(md: str) -> dict[str, dict]:
    """``train_images_per_second.<model>`` from a bench_training.py --matrix table (the fastest configuration)."""
    out = {}
    for block in re.finditer(r"^(\w+) \((\d+) x \d+ x 3, (\d+) classes\):\n\n(\|.*?)(?:\n\n|\Z)", md, re.M | re.S):
        model = block.group(1)
        rows = re.findall(r"^\| (.+?) \| ([\d.]+) \|", block.group(4), re.M)
        if rows:
            name, value = max(rows, key=lambda r: float(r[1]))
            out[f"train_images_per_second.{model}"] = {
                "value": float(value), "unit": "images/s", "assumed": False,
                "source": f"bench_training.py --matrix, {block.group(2)} px, {block.group(3)} classes: fastest configuration '{name}' "
                          "(images/s of all networks of the group: what a group of experts achieves)"}
    if not out:
        raise TeslaError("training table: no 'MODEL (R x R x 3, C classes):' block with a '| configuration | images/s |' table")
    return out


def convert(engine: list[Path], training: list[Path], base: Path | None, machine: str) -> dict[str, Any]:
    """A rates document from the GPU parts' tables, other rates carried over from ``base``."""
    rates: dict[str, dict] = {}
    if base is not None:
        for name, r in Rates(base).rates.items():
            rates[name] = dict(r, source=f"carried over from {base.name}: {r['source']}")
    for p in engine:
        rates.update(engine_rate(p.read_text()))
    for p in training:
        rates.update(training_rate(p.read_text()))
    return {"format": RATES_FORMAT, "format_version": RATES_VERSION, "machine": machine, "rates": rates}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["rates"]:
        p = argparse.ArgumentParser(prog="project_cost.py rates", description="rates file from the GPU parts' tables")
        p.add_argument("--engine", type=Path, nargs="*", default=[], help="engine_*.md of bench/gpu_benchmarks.sh engine")
        p.add_argument("--training", type=Path, nargs="*", default=[], help="*_float32.md / *_bf16.md / models_64px.md of bench/gpu_benchmarks.sh training")
        p.add_argument("--base", type=Path, help="rates file whose other rates are carried over")
        p.add_argument("--machine", required=True, help="the GPU and the date, in words")
        p.add_argument("--out", type=Path, required=True)
        a = p.parse_args(argv[1:])
        a.out.write_text(yaml.safe_dump(convert(a.engine, a.training, a.base, a.machine), sort_keys=False, width=200))
        print(f"wrote {a.out}")
        return 0
    p = argparse.ArgumentParser(description="GPU-hours per stage of one workflow target, from a rates file")
    p.add_argument("--rates", type=Path, required=True)
    p.add_argument("--config", type=Path, default=ROOT / "config" / "config.yaml")
    p.add_argument("--dataset", default="in1k")
    p.add_argument("--ipc", type=int, default=50)
    p.add_argument("--train-images", type=int, default=IN1K_TRAIN, help="training split size (default: ImageNet-1K's)")
    p.add_argument("--test-images", type=int, default=IN1K_TEST, help="test split size (default: ImageNet-1K's validation)")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--budget-hours", type=float, default=12.0, help="target to compare with, in GPU-hours (default: 12 H100-hours)")
    p.add_argument("--out", type=Path, help="also write the table here")
    p.add_argument("--gpus", type=int, nargs="+", help="instead: the distillation's wall time over each number of GPUs")
    a = p.parse_args(argv)
    try:
        entry = yaml.safe_load(a.config.read_text())["datasets"][a.dataset]
        rates = Rates(a.rates)
        if a.gpus:
            params = model_parameters(entry, a.classes)
            rows = scale_distill(entry, a.ipc, rates, a.classes, sorted(set(a.gpus)), params)
            traffic = distill_traffic(entry["distill"][a.ipc], a.ipc, a.classes, params, 3 * int(entry.get("resolution", 32)) ** 2)
            table = render_scaling(rows, rates, f"results/{a.dataset}_ipc{a.ipc}", traffic, params)
        else:
            table = render(project(entry, a.dataset, a.ipc, rates, a.train_images, a.test_images, a.classes), rates,
                           f"results/{a.dataset}_ipc{a.ipc}/acc.csv", a.budget_hours)
    except TeslaError as exc:
        print(f"project_cost.py: {exc}", file=sys.stderr)
        return 2
    print(table)
    if a.out:
        a.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

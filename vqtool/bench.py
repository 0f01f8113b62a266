"""Benchmarks that print figures: model-only throughput/latency per backend, and folder encode end to end.

Every ratio is against a baseline measured in the same run on the same machine: PyTorch eager for
the model, and for a folder the script a user would otherwise write (a Pillow loop + batched eager).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vqtool.backends import BF16, INT8, PRECISIONS, graph_key, offers, open_runner
from vqtool.errors import VqtoolError
from vqtool.limits import DEFAULT_MAX_PIXELS
from vqtool.manifest import Manifest
from vqtool.runtime import Runner

BATCH_SIZES = (1, 32, 256)
# Eager PyTorch on the CPU first: it is the baseline every ratio is taken against.
CANDIDATES = (
    ("torch", "cpu"),
    ("onnxruntime", "cpu"),
    ("openvino", "cpu"),
    ("torch", "cuda"),
    ("onnxruntime", "cuda"),
    ("onnxruntime-trt", "cuda"),
    ("tensorrt", "cuda"),
)
BASELINE = "torch"
ROUNDS = 3
# ONNX Runtime's CPU provider emulates FP16 with casts (slower than FP32), so folders are timed at these.
FOLDER_RUNS = (
    ("onnxruntime", "fp32"),
    ("onnxruntime", INT8),
    ("openvino", "fp32"),
    ("openvino", BF16),
    ("openvino", INT8),
)


@dataclass(frozen=True)
class Timing:
    images_per_s: float
    p50_ms: float
    p99_ms: float
    iterations: int


def call_latencies(
    call: Callable[[], object], *, warmup: int = 3, min_seconds: float = 1.0, min_iterations: int = 10
) -> np.ndarray:
    """Seconds per call, after a warm-up, for at least `min_seconds` and `min_iterations` calls."""
    for _ in range(warmup):
        call()
    latencies: list[float] = []
    started = time.perf_counter()
    while len(latencies) < min_iterations or time.perf_counter() - started < min_seconds:
        begin = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - begin)
    return np.asarray(latencies)


def _timing(latencies: np.ndarray, images: int, images_per_s: float | None = None) -> Timing:
    return Timing(
        images * len(latencies) / latencies.sum() if images_per_s is None else images_per_s,
        float(np.percentile(latencies, 50) * 1e3),
        float(np.percentile(latencies, 99) * 1e3),
        len(latencies),
    )


def time_calls(
    call: Callable[[], object], images: int, *, warmup: int = 3, min_seconds: float = 1.0, min_iterations: int = 10
) -> Timing:
    """Latency percentiles per call and throughput over all calls, after a warm-up."""
    latencies = call_latencies(call, warmup=warmup, min_seconds=min_seconds, min_iterations=min_iterations)
    return _timing(latencies, images)


def time_interleaved(
    calls: Sequence[Callable[[], object]], images: int, *, seconds: float = 1.0, rounds: int = ROUNDS
) -> list[tuple[Timing, list[float]]]:
    """Time several contenders in alternating rounds: (timing, throughput per round) for each.

    A shared machine drifts in speed over seconds; in rounds every contender sees the same drift,
    so per-round ratios between them hold even when absolute figures move. Throughput is the median
    over rounds; latency percentiles pool all calls.
    """
    latencies: list[list[np.ndarray]] = [[] for _ in calls]
    for _ in range(rounds):
        for index, call in enumerate(calls):
            latencies[index].append(call_latencies(call, min_seconds=seconds / rounds, min_iterations=3))
    results = []
    for per_round in latencies:
        speeds = [images * len(lat) / lat.sum() for lat in per_round]
        results.append((_timing(np.concatenate(per_round), images, float(np.median(speeds))), speeds))
    return results


def encoder_flops_per_image(manifest: Manifest) -> float:
    """Multiply-adds x 2 of the encoder graph for one image: its convolutions, residual blocks, projection, distances.

    4x4 stride-2 convolutions where the side halves, 3x3 stride-1 ones where it does not (downsample < 16);
    checkpoints written before those options existed have the reference design's values.
    """
    config = manifest.model_config
    widths = [3, *config["channels"], config["dim"]]
    halvings = manifest.downsample.bit_length() - 1
    side, macs = manifest.image_size, 0
    for index, (fan_in, fan_out) in enumerate(zip(widths, widths[1:], strict=False)):
        if index < halvings:
            side //= 2
        macs += side * side * fan_out * fan_in * (16 if index < halvings else 9)
        if index == len(widths) - 3:  # residual blocks sit after the last encoder convolution
            macs += config.get("res_blocks", 0) * side * side * fan_out * fan_out * (9 + 1)
    search = config.get("lookup_dim") or config["dim"]
    if config.get("lookup_dim"):
        macs += side * side * config["dim"] * search
    macs += side * side * config["codes"] * search
    return 2.0 * macs


def fp32_matmul_flops(seconds: float = 1.0, size: int = 1024, rounds: int = 5) -> float:
    """FP32 floating-point operations per second of one large matrix product with PyTorch's BLAS, all cores.

    A practical ceiling for FP32 convolutions on this CPU: they are matrix products with worse shapes.
    The best of several short rounds, since a shared machine only ever makes it look slower.
    """
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    per_round = [call_latencies(lambda: torch.mm(a, b), min_seconds=seconds / rounds) for _ in range(rounds)]
    return 2.0 * size**3 / min(float(np.median(latencies)) for latencies in per_round)


@dataclass(frozen=True)
class Roofline:
    """The FP32 encoder's work per image against this CPU's FP32 matrix-multiply rate."""

    encoder_flop_per_image: float
    fp32_matmul_flop_per_s: float
    reached: dict[str, float]  # backend -> fastest FP32 CPU encode, as a fraction of the ceiling

    @property
    def ceiling_images_per_s(self) -> float:
        return self.fp32_matmul_flop_per_s / self.encoder_flop_per_image

    def describe(self) -> str:
        shares = ", ".join(f"{backend} {share:.0%}" for backend, share in self.reached.items())
        return (
            f"FP32 ceiling: a 1024x1024 FP32 matrix product runs at {self.fp32_matmul_flop_per_s / 1e9:.0f} GFLOP/s "
            f"here and the encoder needs {self.encoder_flop_per_image / 1e6:.1f} MFLOP per image, so FP32 encoding "
            f"tops out near {self.ceiling_images_per_s:,.0f} images/s" + (f" (reached: {shares})" if shares else "")
        )

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "ceiling_images_per_s": self.ceiling_images_per_s}


def fp32_roofline(manifest: Manifest, rows: Sequence[ModelRow], seconds: float = 1.0) -> Roofline:
    flops, peak = encoder_flops_per_image(manifest), fp32_matmul_flops(seconds)
    reached: dict[str, float] = {}
    for row in rows:
        if row.stage == "encode" and row.precision == "fp32" and "cpu" in row.provider.lower():
            reached[row.backend] = max(reached.get(row.backend, 0.0), row.images_per_s * flops / peak)
    return Roofline(flops, peak, reached)


@dataclass(frozen=True)
class ModelRow:
    stage: str
    backend: str
    provider: str
    precision: str
    batch: int
    images_per_s: float
    p50_ms: float
    p99_ms: float
    vs_baseline: float | None


def model_only(
    export_dir: Path,
    manifest: Manifest,
    *,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    backends: Sequence[str] | None = None,
    seconds: float = 1.0,
    log: Callable[[str], None] = print,
) -> tuple[list[ModelRow], list[str]]:
    """Encode and decode throughput for every backend/precision that starts here, and the eager baseline."""
    rng = np.random.default_rng(0)
    size, grid = manifest.image_size, manifest.grid
    rows: list[ModelRow] = []
    skipped: list[str] = []
    for stage, role in (("encode", "encoder"), ("decode", "decoder")):
        runners: list[tuple[str, Runner]] = []
        for backend, device in CANDIDATES:
            if backends is not None and backend not in backends and backend != BASELINE:
                continue
            for precision in PRECISIONS:
                if not offers(backend, precision):
                    continue
                if backend != "torch" and graph_key(role, precision) not in manifest.graphs:
                    continue
                if precision == INT8 and device != "cpu":
                    continue  # INT8 is built for ONNX Runtime's CPU provider only
                try:
                    opened = open_runner(
                        export_dir, manifest, role, backend=backend, device=device, precision=precision, spin=True
                    )
                except VqtoolError as exc:
                    skipped.append(f"{stage} {backend} on {device} ({precision}): {str(exc).split('; ')[0]}")
                    continue
                runners.append((precision, opened.runner))
        for batch in batch_sizes:
            if stage == "encode":
                data = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
            else:
                data = rng.integers(0, manifest.codes, (batch, grid, grid), dtype=np.int32)
            calls = [lambda r=runner, d=data: r(d) for _, runner in runners]
            timings = time_interleaved(calls, batch, seconds=seconds)
            base = [s for (_, r), (_, s) in zip(runners, timings, strict=True) if r.backend == BASELINE]
            for (precision, runner), (timing, speeds) in zip(runners, timings, strict=True):
                # The median of per-round ratios: both sides of each ratio were timed seconds apart.
                ratio = float(np.median(np.divide(speeds, base[0]))) if base else None
                log(f"{stage} batch {batch:>3} {runner.backend} {precision}: {timing.images_per_s:,.0f} images/s")
                rows.append(
                    ModelRow(
                        stage,
                        runner.backend,
                        runner.provider,
                        precision,
                        batch,
                        timing.images_per_s,
                        timing.p50_ms,
                        timing.p99_ms,
                        ratio,
                    )
                )
    return rows, skipped


@dataclass(frozen=True)
class FolderResult:
    """End-to-end encode of a folder at one precision, with each stage alone and the naive script, on the same files.

    Each stage alone runs as configured in the pipeline (`readers` processes; inference on every
    core), i.e. on the whole machine. Where both stages are CPU-bound on the
    same cores, the pipeline cannot beat `sharing_bound`: each image costs the CPU time of both.
    """

    backend: str
    precision: str
    images: int
    readers: int
    pipeline_images_per_s: float
    naive_images_per_s: float
    read_only_images_per_s: float
    model_only_images_per_s: float
    agreement_with_naive: float

    @property
    def vs_naive(self) -> float:
        return self.pipeline_images_per_s / self.naive_images_per_s

    @property
    def vs_slower_stage(self) -> float:
        return self.pipeline_images_per_s / min(self.read_only_images_per_s, self.model_only_images_per_s)

    @property
    def sharing_bound(self) -> float:
        """Throughput if the two stages split the same cores perfectly: 1 / (1/read + 1/model)."""
        return 1.0 / (1.0 / self.read_only_images_per_s + 1.0 / self.model_only_images_per_s)

    def to_dict(self) -> dict[str, float | int | str | None]:
        return {
            **asdict(self),
            "vs_naive": self.vs_naive,
            "vs_slower_stage": self.vs_slower_stage,
            "sharing_bound_images_per_s": self.sharing_bound,
            "vs_sharing_bound": self.pipeline_images_per_s / self.sharing_bound,
        }


def naive_script(files: Sequence[Path], checkpoint: Path, size: int, batch_size: int) -> np.ndarray:
    """What a user writes without vqtool: a Pillow loop, then batched PyTorch eager."""
    import torch
    from PIL import Image

    from vqtool.train.checkpoint import load_checkpoint

    model = load_checkpoint(checkpoint).model.eval()
    images = [np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)) for f in files]
    codes = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.stack(images[start : start + batch_size]))
            x = batch.permute(0, 3, 1, 2).float() / 127.5 - 1.0
            codes.append(model.encode(x).numpy())
    return np.concatenate(codes)


def folder_encode(
    files: Sequence[Path],
    export_dir: Path,
    manifest: Manifest,
    scratch: Path,
    *,
    batch_size: int = 256,
    backends: Sequence[str] | None = None,
    rounds: int = ROUNDS,
    log: Callable[[str], None] = print,
) -> list[FolderResult]:
    """Time vqtool's streaming encode on the CPU at each precision exported, each stage alone, and the naive script.

    In alternating rounds, each figure the median over them: the naive script here, then vqtool's stages
    and pipelines in a fresh process without PyTorch, as `vqtool encode` runs. In this process, where
    PyTorch is loaded, forking the reader processes took 21-24 ms against 6 ms (AMD EPYC), 5% of
    encoding 10,000 32x32 PNG files: a cost of the benchmark, not of vqtool encode.
    """
    import json
    import subprocess
    import sys

    from vqtool.cores import reader_count

    count, size = len(files), manifest.image_size
    readers = reader_count()
    for path in files:  # every contender then reads from the page cache, whichever runs first
        path.read_bytes()
    runs = [
        (backend, precision)
        for backend, precision in FOLDER_RUNS
        if graph_key("encoder", precision) in manifest.graphs and not (backends and backend not in backends)
    ]
    request = {
        "files": [str(f) for f in files],
        "export_dir": str(export_dir),
        "scratch": str(scratch),
        "batch_size": batch_size,
        "readers": readers,
        "runs": runs,
    }
    naive: list[float] = []
    measured: list[dict[str, Any]] = []
    for _ in range(rounds):
        started = time.perf_counter()
        naive_codes = naive_script(files, export_dir / (manifest.pytorch_file or "model.pt"), size, batch_size)
        naive.append(count / (time.perf_counter() - started))
        child = subprocess.run(
            [sys.executable, "-m", "vqtool.folder_timing"],
            input=json.dumps(request),
            capture_output=True,
            text=True,
            check=False,
        )
        if child.returncode != 0:
            raise VqtoolError(f"the folder timing process failed: {(child.stderr.strip().splitlines() or ['?'])[-1]}")
        measured.append(json.loads(child.stdout))
    for reason in measured[-1]["not_measured"]:
        log(f"folder encode not measured: {reason}")
    read_only = float(np.median([m["read_only"] for m in measured]))
    results = []
    for backend, precision in (tuple(run) for run in measured[-1]["runs"]):
        key = f"{backend}/{precision}"
        model = float(np.median([m["model_only"][key] for m in measured]))
        pipeline = float(np.median([m["pipeline"][key] for m in measured]))
        agreement = float((np.load(scratch / f"codes.{backend}.{precision}.npy") == naive_codes).mean())
        log(
            f"folder encode {backend} {precision}: {pipeline:,.0f} images/s; "
            f"{agreement:.4%} of codes equal the naive script's"
        )
        results.append(
            FolderResult(
                backend, precision, count, readers, pipeline, float(np.median(naive)), read_only, model, agreement
            )
        )
    return results


def fastest_runtimes(rows: Sequence[ModelRow]) -> list[dict[str, Any]]:
    """Per stage and precision, the fastest runtime at the largest batch measured (eager is the baseline only)."""
    largest = max((r.batch for r in rows), default=0)
    best: dict[tuple[str, str], ModelRow] = {}
    for row in rows:
        if row.batch != largest or row.backend == BASELINE:
            continue
        key = (row.stage, row.precision)
        if key not in best or row.images_per_s > best[key].images_per_s:
            best[key] = row
    return [
        {"stage": r.stage, "precision": r.precision, "backend": r.backend, "provider": r.provider, "batch": r.batch}
        | {"images_per_s": r.images_per_s, "vs_baseline": r.vs_baseline}
        for r in best.values()
    ]


def run_bench(
    export_dir: Path,
    *,
    images: Path | None = None,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    backends: Sequence[str] | None = None,
    seconds: float = 1.0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    out: Path | None = None,
    log: Callable[[str], None] = print,
    show: Callable[[Any], None] | None = None,
) -> tuple[dict[str, Any], Path]:
    """What `vqtool bench` does: model-only timings against eager (and a folder end to end with `images`).

    `show` receives each result table as it is ready. Returns the report and where it was written
    (`out`, default EXPORT_DIR/bench.json).
    """
    import os

    from vqtool.atomic import write_json
    from vqtool.images import list_images, read_rgb
    from vqtool.manifest import read_manifest
    from vqtool.tables import bench_table, folder_table

    manifest = read_manifest(export_dir)
    if min(batch_sizes) < 1:
        raise VqtoolError(f"--batch must be at least 1, got {min(batch_sizes)}")
    if not seconds > 0:
        raise VqtoolError(f"--seconds must be positive, got {seconds}")
    files = list_images([images]) if images is not None else []
    for path in files:  # the naive script reads with plain Pillow: check every file before timing anything
        read_rgb(path, max_pixels)
    rows, skipped = model_only(
        export_dir, manifest, batch_sizes=batch_sizes, backends=backends, seconds=seconds, log=log
    )
    from vqtool.cores import cpu_description

    report: dict[str, Any] = {
        "cpu": cpu_description(),
        "cpu_count": os.cpu_count(),
        "model_only": [vars(r) for r in rows],
        "skipped": skipped,
        "fastest": fastest_runtimes(rows),
    }
    if show is not None:
        show(bench_table(report["model_only"]))
    for reason in skipped:
        log(f"not measured: {reason}")
    log(f"fastest here, at batch {max(batch_sizes)} (CPU: {report['cpu']}):")
    for entry in report["fastest"]:
        log(
            f"  {entry['stage']} {entry['precision']}: {entry['backend']} {entry['images_per_s']:,.0f} images/s"
            + (f" ({entry['vs_baseline']:.2f}x eager)" if entry["vs_baseline"] else "")
        )
    roofline = fp32_roofline(manifest, rows, seconds)
    log(roofline.describe())
    report["fp32_roofline"] = roofline.to_dict()
    if files:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="vqtool-bench-") as scratch:
            folder = folder_encode(files, export_dir, manifest, Path(scratch), backends=backends, log=log)
        report["folder_encode"] = [result.to_dict() for result in folder]
        if show is not None:
            show(folder_table(report["folder_encode"]))
    target = out or export_dir / "bench.json"
    write_json(target, report)
    return report, target

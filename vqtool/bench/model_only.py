"""Model-only throughput: each runtime and precision that starts here against PyTorch eager, on random inputs,
and the FP32 encoder's work against this CPU's matrix-multiply rate."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vqtool.bench.timing import call_latencies, time_interleaved
from vqtool.errors import VqtoolError
from vqtool.formats.manifest import Manifest, graph_key, verify_pytorch_file
from vqtool.formats.records import ModelRow
from vqtool.precisions import FP32, PRECISIONS
from vqtool.runtime.base import REFERENCE, RUNTIMES, Runner, is_reference, runs
from vqtool.runtime.select import open_runner

BATCH_SIZES = (1, 32, 256)


def encoder_flops_per_image(export_dir: Path, manifest: Manifest) -> float:
    """Floating-point operations (multiply-adds x 2) of the encoder graph for one image, counted on the model."""
    from vqtool.model.checkpoint import load_checkpoint
    from vqtool.model.vqvae import encoder_macs

    return 2.0 * encoder_macs(load_checkpoint(verify_pytorch_file(export_dir, manifest)).model)


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


def fp32_roofline(export_dir: Path, manifest: Manifest, rows: Sequence[ModelRow], seconds: float = 1.0) -> Roofline:
    flops, peak = encoder_flops_per_image(export_dir, manifest), fp32_matmul_flops(seconds)
    reached: dict[str, float] = {}
    for row in rows:
        if row.stage == "encode" and row.precision == FP32 and "cpu" in row.provider.lower():
            reached[row.backend] = max(reached.get(row.backend, 0.0), row.images_per_s * flops / peak)
    return Roofline(flops, peak, reached)


def _start_runners(
    export_dir: Path, manifest: Manifest, role: str, backends: Sequence[str] | None, skipped: list[str]
) -> list[tuple[str, Runner, bool]]:
    """Every runtime and precision in the table that starts here for `role` (`backends` limits which; the baseline,
    eager FP32 PyTorch on the CPU, always), in its order: (precision, runner, whether it is the baseline)."""
    stage = "encode" if role == "encoder" else "decode"
    runners: list[tuple[str, Runner, bool]] = []
    for runtime in RUNTIMES:
        for precision in PRECISIONS:
            baseline = is_reference(runtime.backend, runtime.device, precision)
            if backends is not None and runtime.backend not in backends and not baseline:
                continue
            if not runs(runtime.backend, precision, runtime.device):
                continue
            if runtime.backend != REFERENCE and graph_key(role, precision) not in manifest.graphs:
                continue
            try:
                opened = open_runner(
                    export_dir,
                    manifest,
                    role,
                    backend=runtime.backend,
                    device=runtime.device,
                    precision=precision,
                    spin=True,
                )
            except VqtoolError as exc:
                skipped.append(
                    f"{stage} {runtime.backend} on {runtime.device} ({precision}): {str(exc).split('; ')[0]}"
                )
                continue
            runners.append((precision, opened.runner, baseline))
    return runners


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
        if role not in manifest.roles:
            skipped.append(f"{stage}: the model has no {role}")
            continue
        runners = _start_runners(export_dir, manifest, role, backends, skipped)
        for batch in batch_sizes:
            if stage == "encode":
                data = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
            else:
                data = rng.integers(0, manifest.codes, (batch, grid, grid), dtype=np.int32)
            calls = [lambda r=runner, d=data: r(d) for _, runner, _ in runners]
            timings = time_interleaved(calls, batch, seconds=seconds)
            base = [s for (_, _, baseline), (_, s) in zip(runners, timings, strict=True) if baseline]
            for (precision, runner, _), (timing, speeds) in zip(runners, timings, strict=True):
                # The median of per-round ratios: both sides of each ratio were timed seconds apart.
                ratio = float(np.median(np.divide(speeds, base[0]))) if base else None
                log(f"{stage} batch {batch:>3} {runner.backend} {precision}: {timing.images_per_s:,.0f} images/s")
                rows.append(
                    ModelRow(
                        stage=stage,
                        backend=runner.backend,
                        provider=runner.provider,
                        precision=precision,
                        batch=batch,
                        images_per_s=timing.images_per_s,
                        p50_ms=timing.p50_ms,
                        p99_ms=timing.p99_ms,
                        vs_baseline=ratio,
                    )
                )
        for _, runner, _ in runners:
            runner.close()
    return rows, skipped


def fastest_runtimes(rows: Sequence[ModelRow]) -> list[dict[str, Any]]:
    """Per stage and precision, the fastest runtime at the largest batch measured (eager FP32 is the baseline only;
    PyTorch under autocast is a contender)."""
    largest = max((r.batch for r in rows), default=0)
    best: dict[tuple[str, str], ModelRow] = {}
    for row in rows:
        if row.batch != largest or (row.backend, row.precision) == (REFERENCE, FP32):
            continue
        key = (row.stage, row.precision)
        if key not in best or row.images_per_s > best[key].images_per_s:
            best[key] = row
    return [
        {"stage": r.stage, "precision": r.precision, "backend": r.backend, "provider": r.provider, "batch": r.batch}
        | {"images_per_s": r.images_per_s, "vs_baseline": r.vs_baseline}
        for r in best.values()
    ]

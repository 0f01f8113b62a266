"""Folder encode end to end: vqtool's streaming pipeline, each of its stages alone, and the script a user would
otherwise write (a Pillow loop + batched PyTorch eager), on the same files."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vqtool.bench.timing import ROUNDS
from vqtool.errors import VqtoolError
from vqtool.formats.manifest import Manifest, graph_key, verify_pytorch_file
from vqtool.precisions import FP16
from vqtool.runtime.base import REFERENCE, RUNTIMES, Device

# Every CPU runtime at each precision it runs, but FP16: ONNX Runtime's CPU provider emulates it with casts,
# slower than FP32, so no one encodes a folder that way.
FOLDER_RUNS = tuple(
    (r.backend, p)
    for r in RUNTIMES
    if r.device == Device.cpu.value and r.backend != REFERENCE
    for p in r.precisions
    if p != FP16
)


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

    from vqtool.model.checkpoint import load_checkpoint

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
    and pipelines in a fresh process without PyTorch, as `vqtool encode` runs: forking the reader processes
    from a process that has loaded PyTorch takes several times longer, a cost of the benchmark, not of
    vqtool encode.
    """
    import json
    import subprocess
    import sys

    from vqtool.host import reader_count

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
        naive_codes = naive_script(files, verify_pytorch_file(export_dir, manifest), size, batch_size)
        naive.append(count / (time.perf_counter() - started))
        child = subprocess.run(
            [sys.executable, "-m", "vqtool.bench.folder_process"],
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

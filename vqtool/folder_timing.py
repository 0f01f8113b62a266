"""The torch-free half of `vqtool bench --images`: vqtool's folder encode and its stages, timed in a fresh process.

Reads a JSON request on stdin (files, export folder, scratch folder, batch size, readers, runs as
[backend, precision] pairs) and writes images/s for reading alone, each runtime alone and each
pipeline on stdout; codes go to SCRATCH/codes.BACKEND.PRECISION.npy for the parent to compare.
"""

from __future__ import annotations

import json
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np


def time_folder(request: dict[str, Any]) -> dict[str, Any]:
    from vqtool.backends import open_runner
    from vqtool.bench import time_calls
    from vqtool.encode import ReadOptions, encode_files, read_batches
    from vqtool.errors import VqtoolError
    from vqtool.manifest import read_manifest

    files = [Path(f) for f in request["files"]]
    export_dir, scratch = Path(request["export_dir"]), Path(request["scratch"])
    batch_size, readers = int(request["batch_size"]), int(request["readers"])
    manifest = read_manifest(export_dir)
    size = manifest.image_size
    report: dict[str, Any] = {"runs": [], "model_only": {}, "pipeline": {}, "not_measured": []}
    started = time.perf_counter()
    for _ in read_batches(files, ReadOptions(size), batch_size, readers, (size, size)):
        pass
    report["read_only"] = len(files) / (time.perf_counter() - started)
    data = np.random.default_rng(0).integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
    for backend, precision in request["runs"]:
        try:
            runner = open_runner(
                export_dir, manifest, "encoder", backend=backend, device="cpu", precision=precision
            ).runner
        except VqtoolError as exc:
            report["not_measured"].append(f"{backend} {precision}: {str(exc).split('; ')[0]}")
            continue
        key = f"{backend}/{precision}"
        report["model_only"][key] = time_calls(partial(runner, data), batch_size, min_seconds=1.0).images_per_s
        result = encode_files(
            files,
            manifest,
            export_dir,
            runner,
            scratch / f"codes.{backend}.{precision}.npy",
            batch_size=batch_size,
            workers=readers,
            precision=precision,
            log=lambda _: None,
        )
        report["pipeline"][key] = len(files) / result.seconds
        report["runs"].append([backend, precision])
    return report


if __name__ == "__main__":
    json.dump(time_folder(json.loads(sys.stdin.read())), sys.stdout)

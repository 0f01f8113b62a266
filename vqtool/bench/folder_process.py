"""The torch-free half of `vqtool bench --images`: vqtool's folder encode and its stages, timed in a fresh process
through the Python API, as `vqtool encode` runs them.

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
    import vqtool
    from vqtool.bench.timing import time_calls
    from vqtool.data import as_image_set
    from vqtool.errors import VqtoolError
    from vqtool.pipeline.reading import ReadOptions, read_batches

    files = [Path(f) for f in request["files"]]
    export_dir, scratch = Path(request["export_dir"]), Path(request["scratch"])
    batch_size, readers = int(request["batch_size"]), int(request["readers"])
    report: dict[str, Any] = {"runs": [], "model_only": {}, "pipeline": {}, "not_measured": []}
    for backend, precision in request["runs"]:
        try:
            tok = vqtool.load(export_dir, backend, "cpu", precision, lazy=True)
            tok.start("encoder")
        except VqtoolError as exc:
            report["not_measured"].append(f"{backend} {precision}: {str(exc).split('; ')[0]}")
            continue
        if "read_only" not in report:
            size = tok.image_size
            started = time.perf_counter()
            for _ in read_batches(as_image_set(files), ReadOptions(size), batch_size, readers, (size, size)):
                pass
            report["read_only"] = len(files) / (time.perf_counter() - started)
        key = f"{backend}/{precision}"
        data = np.random.default_rng(0).integers(0, 256, (batch_size, tok.image_size, tok.image_size, 3), np.uint8)
        encode = partial(tok.encode, data, batch_size=batch_size)
        report["model_only"][key] = time_calls(encode, batch_size, min_seconds=1.0).images_per_s
        out = scratch / f"codes.{backend}.{precision}.npy"
        # Each round writes its own scratch file again.
        result = tok.encode_files(
            files, out, batch_size=batch_size, readers=readers, log=lambda _: None, overwrite=True
        )
        report["pipeline"][key] = len(files) / result.seconds
        report["runs"].append([backend, precision])
        tok.close()
    return report


if __name__ == "__main__":
    json.dump(time_folder(json.loads(sys.stdin.read())), sys.stdout)

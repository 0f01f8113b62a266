"""`vqtool bench`: model-only timings against PyTorch eager, the fastest runtime per stage, and with images a
folder end to end; written to bench.json.

Every ratio is against a baseline measured in the same run on the same machine: PyTorch eager for
the model, and for a folder the script a user would otherwise write (a Pillow loop + batched eager).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vqtool.bench.folder import folder_encode
from vqtool.bench.model_only import BATCH_SIZES, fastest_runtimes, fp32_roofline, model_only
from vqtool.errors import VqtoolError
from vqtool.formats.atomic import write_json
from vqtool.formats.contract import UNCHECKED, contract_of
from vqtool.formats.lock import output_lock
from vqtool.formats.manifest import BENCH_FORMAT, BENCH_NAME, Manifest, read_manifest
from vqtool.formats.outputs import check_bench_output
from vqtool.host import cpu_description
from vqtool.images.limits import DEFAULT_MAX_PIXELS
from vqtool.images.reading import list_images, read_rgb


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
    show: Callable[[str, list[dict[str, Any]]], None] | None = None,
) -> tuple[dict[str, Any], Path]:
    """What `vqtool bench` does: model-only timings against eager (and a folder end to end with `images`).

    `show` receives each part of the report ("model_only", then "folder_encode") as it is ready. Returns the
    report and where it was written (`out`, default EXPORT_DIR/bench.json).
    """
    read_manifest(export_dir)  # no export there: one line, before anything else
    if out is not None:
        check_bench_output(out)
    if min(batch_sizes) < 1:
        raise VqtoolError(f"--batch must be at least 1, got {min(batch_sizes)}")
    if not seconds > 0:
        raise VqtoolError(f"--seconds must be positive, got {seconds}")
    files = list_images([images]) if images is not None else []
    for path in files:  # the naive script reads with plain Pillow: check every file before timing anything
        read_rgb(path, max_pixels)
    target = out or export_dir / BENCH_NAME
    # The export's lock for the whole run: the graphs must not change under the timings (an export replacing them),
    # and two benches must not write one report; --out's too, where the report goes elsewhere.
    with output_lock(export_dir), output_lock(out) if out is not None else contextlib.nullcontext():
        report = _measure(export_dir, read_manifest(export_dir), files, batch_sizes, backends, seconds, log, show)
        write_json(target, report)
    return report, target


def _measure(
    export_dir: Path,
    manifest: Manifest,
    files: list[Path],
    batch_sizes: Sequence[int],
    backends: Sequence[str] | None,
    seconds: float,
    log: Callable[[str], None],
    show: Callable[[str, list[dict[str, Any]]], None] | None,
) -> dict[str, Any]:
    """The bench report: model-only timings, the fastest runtimes with their contracts, the FP32 roofline and,
    with `files`, the folder end to end."""
    rows, skipped = model_only(
        export_dir, manifest, batch_sizes=batch_sizes, backends=backends, seconds=seconds, log=log
    )
    # The contract parity.json publishes each runtime's codes under, beside its speed: speed alone is not a choice.
    runtimes = {(r.backend, r.precision, r.provider) for r in rows}
    contracts = {runtime: contract_of(export_dir, *runtime).name for runtime in runtimes}

    def with_contract(entry: dict[str, Any]) -> dict[str, Any]:
        return {**entry, "contract": contracts[(entry["backend"], entry["precision"], entry["provider"])]}

    report: dict[str, Any] = {
        "format": BENCH_FORMAT,
        "cpu": cpu_description(),
        "cpu_count": os.cpu_count(),
        "model_only": [with_contract(vars(r)) for r in rows],
        "skipped": skipped,
        "fastest": [with_contract(entry) for entry in fastest_runtimes(rows)],
    }
    if show is not None:
        show("model_only", report["model_only"])
    _log_fastest(export_dir, report, skipped, max(batch_sizes), log)
    roofline = fp32_roofline(export_dir, manifest, rows, seconds)
    log(roofline.describe())
    report["fp32_roofline"] = roofline.to_dict()
    if files:
        with tempfile.TemporaryDirectory(prefix="vqtool-bench-") as scratch:
            folder = folder_encode(files, export_dir, manifest, Path(scratch), backends=backends, log=log)
        report["folder_encode"] = [result.to_dict() for result in folder]
        if show is not None:
            show("folder_encode", report["folder_encode"])
    return report


def _log_fastest(
    export_dir: Path, report: dict[str, Any], skipped: list[str], batch: int, log: Callable[[str], None]
) -> None:
    for reason in skipped:
        log(f"not measured: {reason}")
    log(f"fastest here, at batch {batch} (CPU: {report['cpu']}):")
    for entry in report["fastest"]:
        backend, precision, contract = entry["backend"], entry["precision"], entry["contract"]
        if contract == UNCHECKED:  # bench starts no runtime that parity refused: the others met a contract
            contract += f" (vqtool parity {export_dir} --backend {backend} --precision {precision} checks it)"
        else:
            contract += " contract"
        log(
            f"  {entry['stage']} {precision}: {backend} {entry['images_per_s']:,.0f} images/s"
            + (f" ({entry['vs_baseline']:.2f}x eager)" if entry["vs_baseline"] else "")
            + f", {contract}"
        )

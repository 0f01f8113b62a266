"""Runs on a local Ray instance in a process of its own (`python -m tests.ray_scenarios ...`), for tests/test_ray.py.

A Ray driver leaves gRPC's threads and fork handlers behind in its process, even after `ray.shutdown()`, and the
test process forks reader processes afterwards: so the driver side of the tests runs here, and writes what it
saw to OUT for the tests to check.

    python -m tests.ray_scenarios EXPORT_DIR PHOTOS_DIR PARQUET_DIR OUT
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from vqtool.errors import VqtoolError
from vqtool.pipeline.encode import EncodeOptions
from vqtool.ray import TokenizeBatch, engine

BATCH_8 = EncodeOptions(batch_size=8)
RESUMED = EncodeOptions(batch_size=8, resume=True)

DIE_MARKER = "VQTOOL_TEST_DIE_MARKER"


class DiesOnce(TokenizeBatch):
    """A tokenizer actor whose process dies on its first batch of the session (the marker says it happened)."""

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        marker = Path(os.environ[DIE_MARKER])
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            os._exit(1)
        return super().__call__(batch)


def map_batches_on_files(export: Path, photos: Path, out: Path) -> None:
    """Ray Data's own image reader (one array per row, of each file's size), then TokenizeBatch."""
    import ray.data

    ds = ray.data.read_images(str(photos), include_paths=True, mode="RGB", file_extensions=["png", "jpg", "webp"])
    ds = ds.map_batches(TokenizeBatch, fn_constructor_kwargs={"model": str(export)}, concurrency=1, batch_size=16)
    rows = ds.select_columns(["path", "codes"]).take_all()
    paths = np.asarray([r["path"] for r in rows])
    np.savez(out / "read_images.npz", paths=paths, codes=np.stack([r["codes"] for r in rows]))


def map_batches_on_parquet(export: Path, parquet: Path, out: Path) -> None:
    """Image bytes in Parquet (img2dataset's layout), decoded in the actor."""
    import ray.data

    ds = ray.data.read_parquet(str(parquet))
    kwargs = {"model": str(export), "image_column": "jpg"}
    ds = ds.map_batches(TokenizeBatch, fn_constructor_kwargs=kwargs, concurrency=1, batch_size=16)
    rows = ds.select_columns(["key", "codes"]).take_all()
    keys = np.asarray([r["key"] for r in rows])
    np.savez(out / "read_parquet.npz", keys=keys, codes=np.stack([r["codes"] for r in rows]))


def killed_actor(export: Path, photos: Path, out: Path) -> None:
    engine.encode_on_ray([photos], out / "killed.parquet", export, BATCH_8, tokenizer_class=DiesOnce, log=print)


def bad_file_without_skip_bad(export: Path, photos: Path, out: Path) -> None:
    """A broken file among the photographs, without --skip-bad: the run ends with the local engine's error."""
    broken = out / "broken" / "broken.png"
    broken.parent.mkdir()
    broken.write_bytes(b"\x89PNG\r\n\x1a\n but cut short")
    try:
        engine.encode_on_ray([photos, broken.parent], out / "bad.npy", export, BATCH_8, log=print)
    except VqtoolError as error:
        (out / "bad-file.txt").write_text(str(error))


def interrupted_then_resumed(export: Path, photos: Path, out: Path) -> None:
    """Stopped after Ray stored every block but before the rows were joined; one block then cut short, as by a
    writer killed mid-file; a resume with other files refused; the resume proper."""
    codes = out / "resumed.npy"
    joined = engine._join

    def interrupted(*_: Any) -> Any:
        raise KeyboardInterrupt

    engine._join = interrupted  # type: ignore[assignment]
    try:
        engine.encode_on_ray([photos], codes, export, BATCH_8, log=print)
    except KeyboardInterrupt:
        pass
    finally:
        engine._join = joined  # type: ignore[assignment]
    stored = sorted(engine.staging_path(codes).glob("*.parquet"))
    facts: dict[str, Any] = {"blocks": len(stored), "output_before": codes.exists()}
    stored[0].write_bytes(stored[0].read_bytes()[:100])
    facts["kept_rows"] = sum(pq.read_table(p).num_rows for p in stored[1:])
    others = sorted(photos.rglob("*.png"))[:5]
    try:
        engine.encode_on_ray(others, codes, export, RESUMED, log=print)
    except VqtoolError as error:
        facts["refused"] = str(error)
    said: list[str] = []
    engine.encode_on_ray([photos], codes, export, RESUMED, log=said.append)
    facts["said"] = said
    (out / "resume.json").write_text(json.dumps(facts))


def main() -> None:
    import ray

    export, photos, parquet, out = map(Path, sys.argv[1:5])
    # The workers import this checkout's tests (DiesOnce) and learn where the marker of a death goes.
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[1]), DIE_MARKER: os.environ[DIE_MARKER]}
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        map_batches_on_files(export, photos, out)
        map_batches_on_parquet(export, parquet, out)
        killed_actor(export, photos, out)
        bad_file_without_skip_bad(export, photos, out)
        interrupted_then_resumed(export, photos, out)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()

"""Encoding at scale: shards that merge into a single pass, interrupted runs that resume, and the benchmark."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import photo_crops, run_cli, start_cli
from vqtool.train.data.memory import default_training_set


def _png_folder(root: Path, count: int) -> Path:
    """`count` real 32x32 crops of the embedded photographs, as PNG files in two subfolders."""
    crops = default_training_set(32).batch(0, count, seed=5)
    for index, crop in enumerate(crops):
        path = root / f"part{index % 2}" / f"img{index:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(crop).save(path)
    return root


@pytest.fixture(scope="module")
def png_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _png_folder(tmp_path_factory.mktemp("pngs"), 61)


def _encode(folder: Path, export_dir: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    result = run_cli("encode", str(folder), "--model", str(export_dir), "--out", str(out), "--batch-size", "8", *extra)
    assert result.returncode == 0, result.stderr
    return result


def test_shards_merge_into_exactly_the_single_pass(png_folder: Path, export_dir: Path, tmp_path: Path) -> None:
    _encode(png_folder, export_dir, tmp_path / "single.npy")
    for index in range(3):
        _encode(png_folder, export_dir, tmp_path / f"shard{index}.npy", "--shard", f"{index}/3")
    sizes = [len(np.load(tmp_path / f"shard{i}.npy")) for i in range(3)]
    assert sum(sizes) == 61 and max(sizes) - min(sizes) <= 1
    merged = run_cli("merge", *(str(tmp_path / f"shard{i}.npy") for i in (2, 0, 1)), "--out", str(tmp_path / "m.npy"))
    assert merged.returncode == 0, merged.stderr
    assert np.array_equal(np.load(tmp_path / "m.npy"), np.load(tmp_path / "single.npy"))
    assert (tmp_path / "m.json").read_text() == (tmp_path / "single.json").read_text()


def test_merge_refuses_incomplete_duplicated_or_foreign_shards(
    png_folder: Path, export_dir: Path, tmp_path: Path
) -> None:
    for index in range(2):
        _encode(png_folder, export_dir, tmp_path / f"s{index}.npy", "--shard", f"{index}/2")
    missing = run_cli("merge", str(tmp_path / "s0.npy"), "--out", str(tmp_path / "m.npy"))
    assert missing.returncode == 1 and "shards 1/2 are missing" in missing.stderr
    twice = run_cli("merge", str(tmp_path / "s0.npy"), str(tmp_path / "s0.npy"), "--out", str(tmp_path / "m.npy"))
    assert twice.returncode == 1 and "given twice" in twice.stderr
    other = _png_folder(tmp_path / "other", 20)
    _encode(other, export_dir, tmp_path / "o1.npy", "--shard", "1/2")
    foreign = run_cli("merge", str(tmp_path / "s0.npy"), str(tmp_path / "o1.npy"), "--out", str(tmp_path / "m.npy"))
    assert foreign.returncode == 1 and "different sharding" in foreign.stderr
    _encode(png_folder, export_dir, tmp_path / "i1.npy", "--shard", "1/2", "--precision", "fp16")
    mixed = run_cli("merge", str(tmp_path / "s0.npy"), str(tmp_path / "i1.npy"), "--out", str(tmp_path / "m.npy"))
    assert mixed.returncode == 1 and "different precision" in mixed.stderr
    _encode(png_folder, export_dir, tmp_path / "full.npy")
    whole = run_cli("merge", str(tmp_path / "full.npy"), "--out", str(tmp_path / "m.npy"))
    assert whole.returncode == 1 and "not a shard" in whole.stderr
    assert not (tmp_path / "m.npy").exists()
    bad = run_cli(
        "encode", str(png_folder), "--model", str(export_dir), "--out", str(tmp_path / "x.npy"), "--shard", "2/2"
    )
    assert bad.returncode == 1 and "I/N" in bad.stderr


def test_an_interrupted_encode_resumes_to_the_single_pass_result(
    png_folder: Path, export_dir: Path, tmp_path: Path
) -> None:
    # Hard links to a few real PNGs make a list long enough that no machine finishes it before the signal,
    # however many cores it has: one reader, one inference thread, one image per batch.
    total = 30_000
    folder = tmp_path / "many"
    folder.mkdir()
    sources = sorted(png_folder.rglob("*.png"))
    for index in range(total):
        os.link(sources[index % len(sources)], folder / f"img{index:05d}.png")
    out = tmp_path / "codes.npy"
    partial, progress = tmp_path / ".codes.npy.partial", tmp_path / ".codes.npy.progress.json"
    slow = ("--batch-size", "1", "--readers", "1", "--threads", "1")
    process = start_cli("encode", str(folder), "--model", str(export_dir), "--out", str(out), *slow)
    deadline = time.monotonic() + 120
    # The first progress record (written every 2 s, after a finished batch) says rows are done: interrupt then.
    while not progress.exists():
        assert process.poll() is None and time.monotonic() < deadline, "encode ended before it could be interrupted"
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)  # what a scheduler sends when it preempts a job
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "--resume" in stderr, stderr
    assert not out.exists() and partial.exists()
    done = json.loads(progress.read_text())["done"]
    assert 0 < done < total and f"interrupted after {done} of {total}" in stderr

    resumed = run_cli("encode", str(folder), "--model", str(export_dir), "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"after {done} of {total}" in resumed.stderr
    assert not progress.exists() and not partial.exists()
    _encode(folder, export_dir, tmp_path / "single.npy")
    assert np.array_equal(np.load(out), np.load(tmp_path / "single.npy"))


def test_resume_refuses_a_different_file_list(png_folder: Path, export_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "codes.npy"
    signature = {
        "list_sha256": "0" * 64,
        "manifest_sha256": "1" * 64,
        "rows": 61,
        "grid": [2, 2],
        "dtype": "uint8",
        "done": 8,
    }
    np.lib.format.open_memmap(tmp_path / ".codes.npy.partial", mode="w+", dtype=np.uint8, shape=(61, 2, 2)).flush()
    (tmp_path / ".codes.npy.progress.json").write_text(json.dumps(signature))
    result = run_cli("encode", str(png_folder), "--model", str(export_dir), "--out", str(out), "--resume")
    assert result.returncode == 1 and "other files or used another model" in result.stderr
    fresh = run_cli("encode", str(png_folder), "--model", str(export_dir), "--out", str(out))
    assert fresh.returncode == 0 and "starting over" in fresh.stderr and out.exists()


def test_bench_reports_every_backend_against_the_eager_baseline(
    int8_export: Path, png_folder: Path, tmp_path: Path
) -> None:
    result = run_cli(
        "bench",
        str(int8_export),
        "--batch",
        "1",
        "--batch",
        "32",
        "--seconds",
        "0.05",
        "--images",
        str(png_folder),
        "--out",
        str(tmp_path / "bench.json"),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "bench.json").read_text())
    rows = {(r["stage"], r["backend"], r["precision"], r["batch"]): r for r in report["model_only"]}
    for stage in ("encode", "decode"):
        for batch in (1, 32):
            assert rows[(stage, "torch", "fp32", batch)]["vs_baseline"] == 1.0
            onnx_row = rows[(stage, "onnxruntime", "fp32", batch)]
            assert onnx_row["vs_baseline"] > 0 and onnx_row["p99_ms"] >= onnx_row["p50_ms"] > 0
    assert rows[("encode", "onnxruntime", "int8", 32)]["vs_baseline"] > 0
    # Each row says the contract its runtime's codes are published under, as the table beside it does.
    assert rows[("encode", "onnxruntime", "int8", 32)]["contract"] == "bounded"
    assert rows[("encode", "onnxruntime", "fp32", 32)]["contract"] == "exact"
    assert rows[("decode", "torch", "fp32", 1)]["contract"] == "exact"  # the reference
    assert ("decode", "onnxruntime", "int8", 32) not in rows  # INT8 is an encoder only
    folders = {(r["backend"], r["precision"]): r for r in report["folder_encode"]}
    assert {("onnxruntime", "fp32"), ("onnxruntime", "int8")} <= set(folders)
    for folder in folders.values():
        assert folder["images"] == 61 and folder["vs_naive"] > 0 and folder["vs_slower_stage"] > 0
    assert folders[("onnxruntime", "fp32")]["agreement_with_naive"] == 1.0
    assert "× eager" in result.stdout and "naive script" in result.stdout
    assert "bounded" in result.stdout and "exact" in result.stdout  # each runtime's contract beside its speed
    roofline = report["fp32_roofline"]
    assert roofline["fp32_matmul_flop_per_s"] > 0 and {"torch", "onnxruntime"} <= set(roofline["reached"])
    assert "FP32 ceiling" in result.stderr


def test_encoder_flop_count_matches_pytorchs_flop_counter(trained_checkpoint: Path, export_dir: Path) -> None:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from vqtool.bench.model_only import encoder_flops_per_image
    from vqtool.formats.manifest import read_manifest
    from vqtool.model.checkpoint import load_checkpoint

    model = load_checkpoint(trained_checkpoint).model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.encode(torch.zeros(1, 3, 32, 32))
    assert encoder_flops_per_image(export_dir, read_manifest(export_dir)) == counter.get_total_flops()


def test_worker_and_thread_counts_change_speed_not_results(png_folder: Path, export_dir: Path, tmp_path: Path) -> None:
    _encode(png_folder, export_dir, tmp_path / "default.npy")
    _encode(png_folder, export_dir, tmp_path / "one.npy", "--readers", "1", "--threads", "1")
    _encode(png_folder, export_dir, tmp_path / "three.npy", "--readers", "3", "--threads", "2")
    default = np.load(tmp_path / "default.npy")
    assert np.array_equal(default, np.load(tmp_path / "one.npy"))
    assert np.array_equal(default, np.load(tmp_path / "three.npy"))
    args = ["--model", str(export_dir), "--out", str(tmp_path / "decoded")]
    for writers in ("1", "3"):
        result = run_cli(
            "decode", str(tmp_path / "default.npy"), *args, "--writers", writers, "--threads", "1", "--overwrite"
        )
        assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "decoded").glob("*.png"))) == 61
    refused = run_cli(
        "encode", str(png_folder), "--model", str(export_dir), "--out", str(tmp_path / "x.npy"), "--readers", "0"
    )
    assert (
        refused.returncode == 1
        and refused.stderr.strip().splitlines()[-1] == "error: --readers must be at least 1, got 0"
    )
    assert not (tmp_path / "x.npy").exists()


@pytest.mark.parametrize("shared", [True, False], ids=["shared-buffer", "pickled"])
def test_read_batches_keep_file_order_across_reader_parts_and_skipped_files(
    shared: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vqtool.data import as_image_set
    from vqtool.pipeline import reading as encode

    if not shared:  # what platforms that spawn rather than fork get
        monkeypatch.setattr(encode, "shared_buffer", lambda size: None)
    files = []
    for index in range(23):
        path = tmp_path / f"img{index:02d}.png"
        if index in (1, 6, 7, 21):  # first and last rows of the readers' parts, and a run of two
            path.write_bytes(b"not a png")
        else:
            Image.fromarray(np.full((32, 32, 3), index * 10, np.uint8)).save(path)
        files.append(path)
    options = encode.ReadOptions(32, skip_bad=True)
    seen: list[int] = []
    skipped: list[str] = []
    owners: list[str] = []
    for batch in encode.read_batches(as_image_set(files), options, batch_size=8, workers=3, shape=(32, 32)):
        assert batch.pixels.shape[1:] == (32, 32, 3)
        seen += [int(image[0, 0, 0]) // 10 for image in batch.pixels]
        owner = batch.pixels
        while isinstance(owner, np.ndarray | memoryview):
            owner = owner.base if isinstance(owner, np.ndarray) else owner.obj
        owners.append(type(owner).__name__)
        skipped += [Path(s.file).name for s in batch.skipped]
    assert seen == [i for i in range(23) if i not in (1, 6, 7, 21)]
    assert skipped == ["img01.png", "img06.png", "img07.png", "img21.png"]
    # Shared: every batch is a view of the buffer the readers wrote; pickled, arrays of their own.
    assert set(owners) == ({"mmap"} if shared else {"NoneType"})


def test_cpu_lanes_split_a_batch_without_changing_its_results(export_dir: Path) -> None:
    from vqtool.runtime.onnxruntime import OnnxRuntimeRunner

    images = np.stack(photo_crops_at_32(37))
    whole = OnnxRuntimeRunner(export_dir / "encoder.onnx", "cpu", threads=1)
    lanes = OnnxRuntimeRunner(export_dir / "encoder.onnx", "cpu", threads=3)
    calls: list[int] = []
    run = lanes._run
    lanes._run = lambda batch: calls.append(len(batch)) or run(batch)  # type: ignore[method-assign]
    codes = lanes(images)
    assert sorted(calls) == [12, 12, 13] and whole.lanes == 1 and lanes.lanes == 3
    assert codes.shape == (37, 2, 2)
    # Each lane runs the same kernels on its rows; a part returned out of place would scramble most codes.
    assert (codes == whole(images)).mean() >= 0.99
    decoder = OnnxRuntimeRunner(export_dir / "decoder.onnx", "cpu", threads=3)
    single = OnnxRuntimeRunner(export_dir / "decoder.onnx", "cpu", threads=1)
    difference = np.abs(decoder(codes).astype(int) - single(codes).astype(int))
    assert difference.max() <= 1
    spinning = OnnxRuntimeRunner(export_dir / "encoder.onnx", "cpu", threads=2, spin=True)
    assert spinning.pipelined() is not spinning and lanes.pipelined() is lanes
    assert (spinning(images[:5]) == whole(images[:5])).mean() >= 0.99  # small batches: the spinning session


def photo_crops_at_32(count: int) -> list[np.ndarray]:
    return [np.asarray(Image.fromarray(c).resize((32, 32))) for c in photo_crops(count, seed=3)]


def test_the_sidecar_is_written_while_images_are_encoded_and_renamed_only_at_the_end(
    png_folder: Path, export_dir: Path, tmp_path: Path
) -> None:
    from vqtool.data import as_image_set
    from vqtool.formats.manifest import read_manifest
    from vqtool.pipeline.encode import EncodeOptions, plan_encode, run_encode
    from vqtool.runtime.onnxruntime import OnnxRuntimeRunner

    runner = OnnxRuntimeRunner(export_dir / "encoder.onnx", "cpu", threads=1)
    out = tmp_path / "codes.npy"
    staged: list[str] = []

    class Watching:
        """The encoder, looking for the sidecar being written beside the output while it codes batches."""

        backend, provider = runner.backend, runner.provider

        def __call__(self, batch: np.ndarray) -> np.ndarray:
            if not (tmp_path / "codes.json").exists():
                staged.extend(p.name for p in tmp_path.glob(".codes.json.*.tmp"))
            return runner(batch)

        def describe(self) -> str:
            return runner.describe()

    files = sorted(png_folder.rglob("*.png"))
    plan = plan_encode(as_image_set(files), read_manifest(export_dir), export_dir, out, EncodeOptions(batch_size=8))
    run_encode(plan, Watching(), log=lambda _: None)
    assert staged  # begun before the last batch was coded, and renamed into place only at the end
    assert json.loads((tmp_path / "codes.json").read_text())["files"] == [str(f) for f in files]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codes.json", "codes.npy"]


def test_a_staged_output_replaces_the_old_file_only_on_commit(tmp_path: Path) -> None:
    from vqtool.formats.atomic import StagedOutput

    final = tmp_path / "out.json"
    final.write_text("old")
    with StagedOutput(final, lambda: b"new") as staged:
        assert final.read_text() == "old"
        staged.commit()
    assert final.read_text() == "new"
    with StagedOutput(final, lambda: b"newer"):
        pass  # left without commit, as when encoding fails
    assert final.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out.json"]

    def broken() -> bytes:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"), StagedOutput(final, broken) as failing:
        failing.commit()
    assert final.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out.json"]

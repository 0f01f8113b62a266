"""Training data read while training runs: folders, path lists, tar shards, memory-mapped arrays, CIFAR batches.

Real image files throughout (crops of the photographs bundled with scikit-image, saved as PNG, JPEG and
WebP), real reader processes, and the CLI in a subprocess where a user would meet it.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import interrupted_then_resumed, photo, run_cli, write_photo_folder
from vqtool.data.arrays import NpySet
from vqtool.errors import VqtoolError
from vqtool.model.config import ModelConfig, TrainConfig
from vqtool.train.data.memory import Share, split_training_set
from vqtool.train.data.streaming import IndexedSet, ShardSet, load_training_set, train_view, val_view
from vqtool.train.loop import fit

TINY = ModelConfig(codes=16, dim=8, channels=(8, 16, 32))
QUIET = {"data_source": None, "show_progress": False, "log_epochs": False}


def _write_shards(folder: Path, colours: list[list[int]]) -> list[Path]:
    """One tar shard per list of grey levels, each sample a flat 40x36 PNG of that level (plus a .json member)."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for number, levels in enumerate(colours):
        shards.append(folder / f"train-{number:06d}.tar")
        with tarfile.open(shards[-1], "w") as tar:
            for index, level in enumerate(levels):
                buffer = io.BytesIO()
                Image.fromarray(np.full((40, 36, 3), level, np.uint8)).save(buffer, format="PNG")
                for name, data in ((f"s{index:05d}.png", buffer.getvalue()), (f"s{index:05d}.json", b"{}")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return shards


def test_views_take_a_square_of_the_short_side_resized_to_the_model_size() -> None:
    from vqtool.images.fit import Fit

    pixels = np.asarray(photo("astronaut.png"))[:90, :60]
    crop = train_view(pixels, 32, np.random.default_rng(0), flip=False)
    assert crop.shape == (32, 32, 3)
    squares = [Fit().apply(pixels[t : t + 60], 32, 1, "") for t in range(31)]
    # A square window of the short side (not the image squashed to 32x32), resized.
    assert any(np.array_equal(crop, square) for square in squares)
    assert not np.array_equal(crop, Fit().apply(pixels, 32, 1, ""))
    assert np.array_equal(train_view(pixels, 32, np.random.default_rng(0), flip=True), crop[:, ::-1])
    assert np.array_equal(val_view(pixels, 32), squares[15])
    small = np.asarray(photo("astronaut.png"))[:20, :24]  # smaller than the model's side: scaled up
    assert train_view(small, 32, np.random.default_rng(0), flip=False).shape == (32, 32, 3)
    sliver = np.zeros((2, 20_000, 3), np.uint8)  # extreme aspect: cut before resizing, never blown up
    assert train_view(sliver, 256, np.random.default_rng(0), flip=False).shape == (256, 256, 3)


def test_ssim_is_measured_on_images_smaller_than_its_usual_window() -> None:
    from vqtool.train.metrics import mean_ssim

    images = np.random.default_rng(0).integers(0, 256, (3, 4, 6, 3), dtype=np.uint8)
    noisy = np.clip(images.astype(int) + np.random.default_rng(1).integers(-40, 40, images.shape), 0, 255)
    assert mean_ssim(images, images) == pytest.approx(1.0) and mean_ssim(images, noisy.astype(np.uint8)) < 0.99
    assert np.isnan(mean_ssim(images[:, :2, :2], images[:, :2, :2]))


def test_a_folder_is_read_by_index_and_batches_do_not_depend_on_the_readers(tmp_path: Path) -> None:
    write_photo_folder(tmp_path / "photos", 30)
    data = load_training_set(tmp_path / "photos", 32)
    assert isinstance(data, IndexedSet) and len(data.train) == 27 and data.val.shape == (3, 32, 32, 3)
    inline = [b.images for _, b in zip(range(5), data.stream(3, 8, 1, Share(workers=0)), strict=False)]
    readers = [b.images for _, b in zip(range(5), data.stream(3, 8, 1, Share(workers=2)), strict=False)]
    assert all(np.array_equal(a, b) for a, b in zip(inline, readers, strict=True))
    assert np.array_equal(data.batch(3, 8, seed=1), inline[0])
    assert not np.array_equal(data.batch(4, 8, seed=1), inline[0])
    # Under torchrun each process reads only its own slice of the global batch.
    halves = [next(data.stream(3, 8, 1, Share(rank=r, world=2, workers=1))).images for r in (0, 1)]
    assert np.array_equal(np.concatenate(halves), inline[0])


def test_a_list_file_names_images_relative_to_its_folder(tmp_path: Path) -> None:
    paths = write_photo_folder(tmp_path / "photos", 12)
    listing = tmp_path / "photos" / "train.txt"
    listing.write_text("# training images\n" + "\n".join(p.relative_to(listing.parent).as_posix() for p in paths[:10]))
    data = load_training_set(listing, 32)
    assert isinstance(data, IndexedSet) and len(data.train) + len(data.val) == 10
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(VqtoolError, match="lists no image paths"):
        load_training_set(tmp_path / "empty.txt", 32)
    listing.write_text("missing.png\n" + listing.read_text())
    with pytest.raises(VqtoolError, match="missing.png"):
        load_training_set(listing, 32, val_data=tmp_path / "photos").batch(0, 10, seed=0)


def test_a_npy_is_read_by_row_and_batches_like_the_array_in_memory(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    images = np.random.default_rng(0).integers(0, 256, (60, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    with monkeypatch.context() as patch:  # never read whole: np.load is not what reads it
        patch.setattr(np, "load", lambda *args, **kwargs: pytest.fail("the .npy was loaded whole"))
        data = load_training_set(tmp_path / "images.npy", 32)
        data.batch(0, 16, seed=3)
    assert isinstance(data, IndexedSet) and isinstance(data.images, NpySet)
    in_memory = split_training_set(images, 32)
    assert np.array_equal(data.val, in_memory.val)
    for step in (0, 1, 9):  # the same batches a run on the array held in memory drew: old runs reproduce
        assert np.array_equal(data.batch(step, 16, seed=3), in_memory.batch(step, 16, seed=3))
    np.savez(tmp_path / "val.npz", images=images[:7])  # --val-data takes every --data form
    assert np.array_equal(load_training_set(tmp_path / "images.npy", 32, val_data=tmp_path / "val.npz").val, images[:7])
    np.save(tmp_path / "grey.npy", images[..., 0])
    (tmp_path / "cut.npy").write_bytes((tmp_path / "images.npy").read_bytes()[:-100])
    for name, problem in (("grey.npy", "shaped N x H x W x 3"), ("cut.npy", "truncated")):
        with pytest.raises(VqtoolError, match=problem):
            load_training_set(tmp_path / name, 32)


def test_tar_shards_stream_in_sequence_hold_out_the_last_shard_and_resume_at_a_shard_boundary(tmp_path: Path) -> None:
    levels = [[10 * s + i for i in range(12)] for s in range(4)]  # each shard its own grey levels
    _write_shards(tmp_path / "shards", levels)
    data = load_training_set(str(tmp_path / "shards" / "train-{000000..000003}.tar"), 32)
    assert isinstance(data, ShardSet) and len(data.shards) == 3
    assert sorted(data.val[:, 0, 0, 0]) == levels[3]  # the last shard is the validation set
    batches = list(zip(range(6), data.stream(0, 8, 0, Share(workers=0)), strict=False))
    seen = {int(v) for _, b in batches for v in b.images[:, 0, 0, 0]}
    assert seen <= {v for shard in levels[:3] for v in shard} and len(seen) > 12
    started = [pair for _, b in batches for pair in b.started]
    assert started and len(set(started)) == len(started)  # (epoch, shard): each shard started once an epoch
    assert {shard for epoch, shard in started if epoch == 0} == set(data.shards)
    # A checkpoint that says shards 0 and 1 were started in epoch 0: the resumed stream skips them.
    skip = [str(tmp_path / "shards" / f"train-{n:06d}.tar") for n in (0, 1)]
    resumed = data.stream(0, 4, 0, Share(workers=0, state={"epoch": 0, "started": skip}))
    first = next(resumed)
    assert set(first.images[:, 0, 0, 0].tolist()) <= set(levels[2]) and first.started[0][1].endswith("02.tar")
    with pytest.raises(VqtoolError, match="one tar shard"):
        load_training_set(tmp_path / "shards" / "train-000000.tar", 32)
    with pytest.raises(VqtoolError, match="every reader needs a shard"):
        next(data.stream(0, 8, 0, Share(workers=4)))


def test_lists_and_tar_shards_train_end_to_end_through_the_cli(tmp_path: Path) -> None:
    write_photo_folder(tmp_path / "photos", 24)
    _write_shards(tmp_path / "shards", [[40 + i for i in range(10)], [90 + i for i in range(10)], [150] * 6])
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(f"photos/sub0/img{i:04d}.png" for i in range(0, 24, 6)) + "\n")
    common = ["--steps", "3", "--steps-per-epoch", "2", "--batch-size", "8", "--codes", "16", "--dim", "8"]
    # Folders and .npy arrays reach the command in tests/test_cli.py and the bad-file test below.
    sources = {
        "list": [str(listing), "--val-data", str(tmp_path / "photos" / "sub1")],
        "shards": [str(tmp_path / "shards" / "train-{000000..000002}.tar"), "--workers", "2"],
    }
    for name, data in sources.items():
        run = tmp_path / f"run-{name}"
        result = run_cli("train", "--data", *data, *common, "--out", str(run))
        assert result.returncode == 0, f"{name}: {result.stderr}"
        final = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
        assert final["step"] == 3 and 0 < final["val_ssim"] <= 1 and final["skipped_files"] == 0
        assert any((run / "tensorboard").iterdir())
    run = tmp_path / "run-list"
    refused = run_cli("train", "--resume", str(run), "--val-data", str(tmp_path / "photos"))
    assert refused.returncode == 1 and "--val-data cannot change on --resume" in refused.stderr
    listed = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert "from" in run_cli("train", "--resume", str(run), "--steps", "4").stderr
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 4
    assert listed["step"] == 3


def test_tensorboard_holds_the_metrics_the_grids_and_the_code_histogram(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vqtool.train.data.memory import default_training_set

    config = TrainConfig(steps=4, batch_size=8, device="cpu", steps_per_epoch=2)
    fit(TINY, config, default_training_set(32), tmp_path / "run", **QUIET)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0}).Reload()
    tags = events.Tags()
    assert {"validation/val_psnr", "validation/val_ssim", "codebook/usage", "train/train_mse"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("validation/val_psnr")] == [2, 4]
    assert "codes/validation_usage" in tags["histograms"] and tags["images"]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in events.Scalars("validation/val_psnr")] == pytest.approx([r["val_psnr"] for r in records])


def test_a_bad_file_stops_the_run_in_one_line_unless_skipped_and_counted(tmp_path: Path) -> None:
    paths = write_photo_folder(tmp_path / "photos", 16)
    bad = paths[5]
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    with pytest.raises(VqtoolError):  # the fault bites: this file cannot be read
        from vqtool.images.reading import read_rgb

        read_rgb(bad)
    write_photo_folder(tmp_path / "val", 4, seed=3)
    # 16 training files at batch 4: one epoch of 4 steps reads every file once.
    common = ["--data", str(tmp_path / "photos"), "--val-data", str(tmp_path / "val"), "--steps", "4"]
    common += ["--batch-size", "4", "--codes", "16", "--dim", "8", "--workers", "1"]
    stopped = run_cli("train", *common, "--out", str(tmp_path / "stopped"))
    assert stopped.returncode == 1 and "Traceback" not in stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1].startswith(f"error: {bad}"), stopped.stderr
    assert not (tmp_path / "stopped" / "checkpoint.pt").exists()
    trained = run_cli("train", *common, "--skip-bad", "--out", str(tmp_path / "run"))
    assert trained.returncode == 0, trained.stderr
    assert f"training skipped 1 of 16 files that could not be used: {bad}" in trained.stderr
    final = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["skipped_files"] == 1


def test_a_folder_run_interrupted_and_resumed_reaches_the_uninterrupted_weights(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    write_photo_folder(tmp_path / "photos", 40)
    data = load_training_set(tmp_path / "photos", 32)
    config = TrainConfig(steps=8, batch_size=8, device="cpu", steps_per_epoch=3, seed=2, workers=2)
    whole = fit(TINY, config, data, tmp_path / "whole", **QUIET)
    resumed = interrupted_then_resumed(  # with another number of readers after the resume
        monkeypatch,
        5,
        lambda: fit(TINY, config, data, tmp_path / "part", **QUIET),
        lambda: fit(TINY, replace(config, workers=1), data, tmp_path / "part", resume=True, **QUIET),
    )
    a = torch.load(whole.checkpoint, weights_only=True)["model"]
    b = torch.load(resumed.checkpoint, weights_only=True)["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)

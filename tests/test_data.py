"""Training data: the embedded default set, its fixed split, and seeded batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vqtool.data.whole import read_image_set
from vqtool.errors import VqtoolError
from vqtool.train.data.memory import default_training_set, split_training_set
from vqtool.train.data.streaming import load_training_set


def test_default_set_is_offline_and_its_validation_split_is_fixed() -> None:
    first, second = default_training_set(32), default_training_set(32)
    assert first.val.shape == (448, 32, 32, 3) and first.val.dtype == np.uint8
    assert np.array_equal(first.val, second.val)
    assert len(first.train) == 7 and all(im.shape[0] >= 32 for im in first.train)


def test_validation_crops_never_come_from_training_pixels() -> None:
    data = default_training_set(32)
    train_patches = {
        bytes(im[r : r + 32, c : c + 32])
        for im in data.train
        for r in range(0, im.shape[0] - 31, 8)
        for c in range(0, im.shape[1] - 31, 8)
    }
    assert not any(bytes(v) in train_patches for v in data.val)


def test_batches_depend_only_on_seed_and_step() -> None:
    data = default_training_set(32)
    assert np.array_equal(data.batch(7, 16, seed=3), data.batch(7, 16, seed=3))
    assert not np.array_equal(data.batch(7, 16, seed=3), data.batch(8, 16, seed=3))
    assert not np.array_equal(data.batch(7, 16, seed=3), data.batch(7, 16, seed=4))


def test_array_split_is_fixed_and_each_epoch_is_a_permutation() -> None:
    images = np.arange(40, dtype=np.uint8)[:, None, None, None] * np.ones((1, 32, 32, 3), np.uint8)
    data = split_training_set(images, 32)
    assert len(data.val) == 4 and len(data.train) == 36
    assert np.array_equal(data.val, split_training_set(images, 32).val)
    epoch = np.concatenate([data.batch(s, 12, seed=0) for s in range(data.steps_per_epoch(12))])
    # Flips do not change a constant image, so each epoch shows every training image exactly once.
    assert sorted(epoch[:, 0, 0, 0]) == sorted(data.train[:, 0, 0, 0])


def test_npy_and_npz_sources(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (10, 48, 48, 3), dtype=np.uint8)
    np.save(tmp_path / "a.npy", images)
    np.savez(tmp_path / "b.npz", images=images)
    for name in ("a.npy", "b.npz"):
        loaded, val = read_image_set(tmp_path / name, 32)
        assert loaded.shape == (10, 32, 32, 3) and val is None
    np.save(tmp_path / "bad.npy", images.astype(np.float32))
    with pytest.raises(VqtoolError, match="expected uint8") as info:
        read_image_set(tmp_path / "bad.npy", 32)
    assert str(tmp_path / "bad.npy") in str(info.value)


def test_folder_source_converts_and_resizes(mixed_folder: Path) -> None:
    data = load_training_set(mixed_folder, 32)
    assert data.val.shape[1:] == (32, 32, 3) and len(data.val) + len(data.train) == 8

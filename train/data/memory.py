"""Training data: the embedded default photographs, splits, and seeded batch sampling (torch-free)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from vqtool.errors import VqtoolError
from vqtool.images.embedded import EMBEDDED_PHOTOS, read_embedded_photo
from vqtool.images.reading import SkippedFile

# Downscaled so a 32x32 crop holds a recognisable part of the scene, as in CIFAR-like data.
DEFAULT_SHORT_SIDE = 256
# The right-hand share of each photo that only validation crops come from.
VALIDATION_SHARE = 0.2
VALIDATION_CROPS_PER_PHOTO = 64
# The default data has no natural epoch (crops are drawn fresh); one epoch is this many crops.
DEFAULT_EPOCH_CROPS = 16_384  # 128 steps at the default batch of 128
# Fixed, independent of the run's seed, so every run and every parity check sees the same split.
SPLIT_SEED = 20_220_801
VALIDATION_FRACTION = 0.1
VALIDATION_MAX = 2_000


@dataclass(frozen=True)
class Batch:
    """One training process's share of a step's batch, as a reader delivers it.

    `skipped` lists the files left out under --skip-bad, `started` the (epoch, tar shard) pairs begun
    since the previous batch (for resuming at a shard boundary), `error` a file that stops the run.
    """

    images: np.ndarray
    skipped: tuple[SkippedFile, ...] = ()
    started: tuple[tuple[int, str], ...] = ()
    error: VqtoolError | None = None

    def checked(self) -> Batch:
        if self.error is not None:
            raise self.error
        return self


@dataclass(frozen=True)
class Share:
    """The part of each step's batch one training process reads, and how: its `rank` among `world` processes, its
    reader processes (`workers`; None: the collection's default, 0: read in the process itself), and where an
    interrupted run's readers had got to (`state`, from its checkpoint)."""

    rank: int = 0
    world: int = 1
    workers: int | None = 0
    state: dict[str, Any] | None = None


class TrainingData(Protocol):
    """What training reads: held-out validation images, seeded batches, and a stream of them for a process."""

    # Read-only, so that a frozen dataclass such as TrainingSet satisfies it.
    @property
    def val(self) -> np.ndarray: ...

    def steps_per_epoch(self, batch_size: int) -> int: ...

    def batch(self, step: int, batch_size: int, seed: int) -> np.ndarray: ...

    def stream(self, start_step: int, batch_size: int, seed: int, share: Share = Share()) -> Iterator[Batch]: ...


@dataclass(frozen=True)
class TrainingSet:
    """Images to draw training batches from and a fixed validation array (N x S x S x 3 uint8).

    `train` holds images at least `size` on each side; with fixed-size arrays (one image per
    sample) each epoch is a permutation, otherwise each sample is a random crop.
    """

    train: tuple[np.ndarray, ...] | np.ndarray
    val: np.ndarray
    size: int
    epoch_size: int

    def steps_per_epoch(self, batch_size: int) -> int:
        return max(1, self.epoch_size // batch_size)

    def batch(self, step: int, batch_size: int, seed: int) -> np.ndarray:
        """The batch for global step `step`: a pure function of (seed, step), so a resumed run repeats it."""
        if isinstance(self.train, np.ndarray) and self.train.shape[1:3] == (self.size, self.size):
            return self._permutation_batch(step, batch_size, seed)
        return self._crop_batch(step, batch_size, seed)

    def stream(self, start_step: int, batch_size: int, seed: int, share: Share = Share()) -> Iterator[Batch]:
        """This process's slice of each step's batch: the images are in memory, so no reader processes."""
        part = batch_size // share.world
        for step in itertools.count(start_step):
            yield Batch(self.batch(step, batch_size, seed)[share.rank * part : (share.rank + 1) * part])

    def _permutation_batch(self, step: int, batch_size: int, seed: int) -> np.ndarray:
        assert isinstance(self.train, np.ndarray)
        picked, flips = permutation_picks(len(self.train), step, batch_size, seed)
        images = self.train[picked]
        images[flips] = images[flips, :, ::-1]
        return images

    def _crop_batch(self, step: int, batch_size: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng([seed, step])
        return random_crops(self.train, self.size, batch_size, rng, flip=True)


def permutation_picks(count: int, step: int, batch_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, flips) of step `step`'s batch when each epoch is a seeded permutation of `count` images."""
    epoch, position = divmod(step, max(1, count // batch_size))
    order = np.random.default_rng([seed, epoch]).permutation(count)
    picked = order[(position * batch_size + np.arange(batch_size)) % count]
    flips = np.random.default_rng([seed, epoch, position, 1]).random(batch_size) < 0.5
    return picked, flips


def random_crops(
    images: tuple[np.ndarray, ...] | np.ndarray, size: int, count: int, rng: np.random.Generator, *, flip: bool
) -> np.ndarray:
    """`count` crops of size x size; an image is picked in proportion to its crop positions."""
    positions = np.array([(im.shape[0] - size + 1) * (im.shape[1] - size + 1) for im in images], dtype=np.float64)
    chosen = rng.choice(len(images), size=count, p=positions / positions.sum())
    out = np.empty((count, size, size, 3), dtype=np.uint8)
    for i, index in enumerate(chosen):
        image = images[index]
        top = rng.integers(0, image.shape[0] - size + 1)
        left = rng.integers(0, image.shape[1] - size + 1)
        crop = image[top : top + size, left : left + size]
        out[i] = crop[:, ::-1] if flip and rng.random() < 0.5 else crop
    return out


def default_training_set(size: int = 32) -> TrainingSet:
    """Random crops of the photographs bundled with scikit-image; validation crops come from a held-out strip."""
    photos = [read_embedded_photo(name, DEFAULT_SHORT_SIDE) for name in EMBEDDED_PHOTOS]
    train_parts, val_parts = [], []
    rng = np.random.default_rng(SPLIT_SEED)
    for photo in photos:
        cut = int(round(photo.shape[1] * (1 - VALIDATION_SHARE)))
        train_parts.append(photo[:, :cut])
        val_parts.append(random_crops((photo[:, cut:],), size, VALIDATION_CROPS_PER_PHOTO, rng, flip=False))
    return TrainingSet(tuple(train_parts), np.concatenate(val_parts), size, DEFAULT_EPOCH_CROPS)


def held_out_split(count: int) -> tuple[np.ndarray, np.ndarray]:
    """(training, validation) indices of a collection of `count` images: a fixed share held out, the same every run."""
    if count < 2:
        raise VqtoolError(f"need at least 2 images to hold one out for validation, got {count}")
    held_out = min(VALIDATION_MAX, max(1, int(count * VALIDATION_FRACTION)))
    order = np.random.default_rng(SPLIT_SEED).permutation(count)
    return np.sort(order[held_out:]), np.sort(order[:held_out])


def split_training_set(images: np.ndarray, size: int, val: np.ndarray | None = None) -> TrainingSet:
    """A fixed train/validation split of an N x S x S x 3 array (unless a validation array is given)."""
    if val is None:
        training, validation = held_out_split(len(images))
        val, images = images[validation], images[training]
    return TrainingSet(images, val, size, len(images))

"""Training collections read while the model trains: image folders, path lists, memory-mapped arrays, tar shards.

Nothing is read whole before the first step. Folders, lists and `.npy` arrays are read by index, so
the batch of a step is a pure function of (seed, step) however many workers read it (and `--resume`
reproduces an uninterrupted run); tar shards are read in sequence, a shard at a time per worker, so
a resumed run continues at the next shard boundary. The embedded photographs, `.npz` arrays and
CIFAR-10's pickled batches stay in memory (memory.py's TrainingSet): they are small or cannot be read by index.
Every collection is read through vqtool.data, as encode, export and parity read it.

Each training sample whose short side differs from the image size is resized so that it equals it,
then cropped to a random square and flipped at random; validation takes the centre crop.
"""

from __future__ import annotations

import functools
import itertools
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vqtool.data.arrays import NpySet
from vqtool.data.cifar import is_cifar_folder
from vqtool.data.sets import FileSet, ImageSet, ref_pixels
from vqtool.data.specs import LIST_SUFFIXES, is_shard_spec, list_file_names
from vqtool.data.tar import expand_shards, shard_images
from vqtool.data.whole import read_image_set
from vqtool.errors import VqtoolError
from vqtool.host import lower_priority
from vqtool.images.fit import CENTER, Fit
from vqtool.images.limits import DEFAULT_MAX_PIXELS
from vqtool.images.reading import SkippedFile, describe_skipped, list_image_names, read_each
from vqtool.train.data.memory import (
    VALIDATION_MAX,
    Batch,
    Share,
    TrainingSet,
    default_training_set,
    held_out_split,
    permutation_picks,
    split_training_set,
)

# Tar shards have no length known without reading them all: an epoch (validation, checkpoint) is this many steps.
SHARD_EPOCH_STEPS = 500
# A tar reader holds this many batches' worth of samples and draws each batch from them at random, so that a
# batch mixes samples of several shards (the shard order itself is shuffled every epoch).
SHUFFLE_BATCHES = 4
# Under --skip-bad an unreadable file is replaced by the next readable one in the collection's order.
REPLACEMENT_TRIES = 64
EMPTY_PASSES = 3


def default_workers() -> int:
    """Reader processes when --workers is not given: one per four cores, so none on two.

    On two cores a reader process competes with the step's two threads for the same cores, and reading in the
    training process trains faster (benchmarks/streaming.py measures both). With more cores a reader overlaps
    its work with the step's instead.
    """
    return (os.cpu_count() or 1) // 4


# ---- views of one image -------------------------------------------------------------------------------


def train_view(
    pixels: np.ndarray, size: int, rng: np.random.Generator | Callable[[], np.random.Generator], flip: bool
) -> np.ndarray:
    """A random square of the image's short side, resized to size x size, optionally flipped.

    The same as resizing the short side to `size` and cropping a random square, but the square is cut at
    the file's resolution first: an image of extreme aspect (2 x 20,000) never becomes a huge resized copy.
    `rng` may be a function that makes the generator: an image already size x size needs none (making
    one costs a good share of reading a small PNG).
    """
    height, width = pixels.shape[:2]
    if height != width:
        rng = rng() if callable(rng) else rng
        side = min(height, width)
        top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
        pixels = pixels[top : top + side, left : left + side]
    crop = Fit().apply(pixels, size, 1, "")
    return crop[:, ::-1] if flip else crop


def val_view(pixels: np.ndarray, size: int) -> np.ndarray:
    """The centre square of the image's short side, resized to size x size (Fit's centre crop, the one there is)."""
    return Fit(CENTER).apply(pixels, size, 1, "")


# ---- collections read by index ----------------------------------------------------------------------------


# One sample of a step's batch: (position in the training order, its crop seed, whether to flip it).
Task = tuple[int, tuple[int, ...], bool]


@dataclass(frozen=True)
class Sample:
    """What a reader returns for one task: the pixels, the files it skipped, or the error that stops the run."""

    pixels: np.ndarray | None
    skipped: tuple[SkippedFile, ...] = ()
    error: VqtoolError | None = None


def read_image(images: ImageSet, index: int, max_pixels: int) -> np.ndarray:
    """One image of a set, by its row."""
    return ref_pixels(images.refs(index, index + 1)[0], max_pixels)


class IndexedSet:
    """A collection read by index while training: each epoch is a seeded permutation of the training images."""

    def __init__(
        self, images: ImageSet, train: np.ndarray, val: np.ndarray, size: int, skip_bad: bool, max_pixels: int
    ) -> None:
        if len(train) == 0:
            raise VqtoolError("no images left to train on after holding out the validation images")
        self.images, self.train, self.val, self.size, self.skip_bad = images, train, val, size, skip_bad
        self.max_pixels = max_pixels

    @property
    def epoch_size(self) -> int:
        return len(self.train)

    def steps_per_epoch(self, batch_size: int) -> int:
        return max(1, len(self.train) // batch_size)

    def plan(self, step: int, batch_size: int, seed: int) -> list[Task]:
        """The tasks of global step `step`; order and flips are drawn as TrainingSet draws them for an array."""
        picked, flips = permutation_picks(len(self.train), step, batch_size, seed)
        return [(int(p), (seed, step, j, 2), bool(f)) for j, (p, f) in enumerate(zip(picked, flips, strict=True))]

    def read_sample(self, task: Task) -> Sample:
        """One task's pixels; under skip_bad an unreadable file gives way to the next readable one in order."""
        position, crop_seed, flip = task
        skipped: list[SkippedFile] = []
        for attempt in range(REPLACEMENT_TRIES if self.skip_bad else 1):
            index = int(self.train[(position + attempt) % len(self.train)])
            try:
                pixels = read_image(self.images, index, self.max_pixels)
            except VqtoolError as error:
                if not self.skip_bad:
                    return Sample(None, error=error)
                skipped.append(SkippedFile.of(error, self.images.name(index)))
                continue
            view = train_view(pixels, self.size, functools.partial(np.random.default_rng, crop_seed), flip)
            return Sample(view, tuple(skipped))
        reason = f"{REPLACEMENT_TRIES} files in a row could not be read (the last: {skipped[-1].reason})"
        return Sample(None, error=VqtoolError(reason, skipped[-1].file))

    def batch(self, step: int, batch_size: int, seed: int) -> np.ndarray:
        """The global batch of `step`, read here (k-means initialisation, INT8 calibration)."""
        return collate([self.read_sample(task) for task in self.plan(step, batch_size, seed)]).checked().images

    def stream(self, start_step: int, batch_size: int, seed: int, share: Share = Share()) -> Iterator[Batch]:
        """This process's share of each step's batch from `start_step` on, read by the share's reader processes
        (None: default_workers())."""
        part, rank = batch_size // share.world, share.rank
        workers = default_workers() if share.workers is None else share.workers

        def steps() -> Iterator[list[Task]]:
            for step in itertools.count(start_step):
                yield self.plan(step, batch_size, seed)[rank * part : (rank + 1) * part]

        if workers == 0:
            return (collate([self.read_sample(t) for t in tasks]).checked() for tasks in steps())
        from torch.utils.data import DataLoader, Dataset

        class Samples(Dataset):  # type: ignore[type-arg]
            def __getitem__(inner, task: Task) -> Sample:  # noqa: N805
                return self.read_sample(task)

        loader = DataLoader(
            Samples(),
            batch_sampler=steps(),  # type: ignore[arg-type]  # any iterable of index lists will do
            num_workers=workers,
            collate_fn=collate,
            prefetch_factor=4,
            worker_init_fn=_lower_priority,
            multiprocessing_context=_FORK,
        )
        return (batch.checked() for batch in loader)


# Readers are forked: they share the file list and the memory map instead of unpickling copies of them
# (spawn would copy a memory-mapped array whole into each reader).
_FORK = "fork" if "fork" in multiprocessing.get_all_start_methods() else None


def _lower_priority(worker: int) -> None:
    # Readers run niced: on a machine as small as the step's own thread count, they take what it leaves idle.
    lower_priority()


def collate(samples: Sequence[Sample]) -> Batch:
    """Stack one step's samples; the first error is kept for the training process to raise."""
    error = next((s.error for s in samples if s.error is not None), None)
    skipped = tuple(file for s in samples for file in s.skipped)
    if error is not None:
        return Batch(np.empty((0,), np.uint8), skipped, error=error)
    return Batch(np.stack([s.pixels for s in samples if s.pixels is not None]), skipped)


# ---- tar shards -------------------------------------------------------------------------------------------


class ShardSet:
    """WebDataset tar shards, read in sequence: each epoch shuffles the shard order, and each reader process
    takes every n-th shard of its training process's own part and mixes samples in a shuffle buffer."""

    epoch_size = None

    def __init__(self, shards: list[str], val: np.ndarray, size: int, max_pixels: int, skip_bad: bool) -> None:
        self.shards, self.val, self.size, self.max_pixels, self.skip_bad = shards, val, size, max_pixels, skip_bad

    def steps_per_epoch(self, batch_size: int) -> int:
        return SHARD_EPOCH_STEPS

    def batch(self, step: int, batch_size: int, seed: int) -> np.ndarray:
        """Batch `step` of one reader's sequence (k-means initialisation, INT8 calibration)."""
        batches = self._batches(batch_size, seed, epoch=0, skip=frozenset(), readers=(0, 1))
        return next(itertools.islice(batches, step, None)).checked().images

    def stream(self, start_step: int, batch_size: int, seed: int, share: Share = Share()) -> Iterator[Batch]:
        """This process's batches; the share's `state` (from a checkpoint) names the shards already started in its
        epoch. Without a `workers` count, no more readers than shards: a default must not refuse a small collection.
        """
        state, rank, world, workers = share.state or {}, share.rank, share.world, share.workers
        epoch = int(state.get("epoch", 0))
        skip = frozenset(state.get("started", ()))
        local = batch_size // world
        if workers is None:
            workers = min(default_workers(), len(self.shards) // world)
        readers = world * max(1, workers)
        if len(self.shards) < readers:
            raise VqtoolError(
                f"{len(self.shards)} training shards for {readers} readers ({world} processes x "
                f"{max(1, workers)} workers): every reader needs a shard of its own; use fewer --workers",
                self.shards[0],
            )
        if workers == 0:
            return (b.checked() for b in self._batches(local, seed, epoch, skip, (rank, world)))
        from torch.utils.data import DataLoader, IterableDataset

        outer = self

        class Stream(IterableDataset):  # type: ignore[type-arg]
            def __iter__(self) -> Iterator[Batch]:
                from torch.utils.data import get_worker_info

                info = get_worker_info()
                worker, count = (info.id, info.num_workers) if info is not None else (0, 1)
                return outer._batches(local, seed, epoch, skip, (rank * count + worker, world * count))

        loader = DataLoader(
            Stream(),
            batch_size=None,
            num_workers=workers,
            collate_fn=_as_is,  # type: ignore[arg-type]  # with batch_size=None it gets each item, not torch's list
            worker_init_fn=_lower_priority,
            multiprocessing_context=_FORK,
        )
        return (batch.checked() for batch in loader)

    def _batches(
        self, size: int, seed: int, epoch: int, skip: frozenset[str], readers: tuple[int, int]
    ) -> Iterator[Batch]:
        """One reader's endless sequence of batches of `size`, from `epoch` on, skipping the shards in `skip`."""
        reader, readers_count = readers
        capacity = SHUFFLE_BATCHES * size
        buffer: list[np.ndarray] = []
        skipped: list[SkippedFile] = []
        started: list[tuple[int, str]] = []
        empty = 0
        for current in itertools.count(epoch):
            order = np.random.default_rng([seed, current]).permutation(len(self.shards))
            rng = np.random.default_rng([seed, current, reader])
            read_any, mine = False, [self.shards[i] for i in order[reader::readers_count]]
            for shard in mine:
                if current == epoch and shard in skip:
                    continue
                started.append((current, shard))
                for name, pixels in shard_images(shard, self.max_pixels):
                    if isinstance(pixels, VqtoolError):
                        if not self.skip_bad:
                            yield Batch(np.empty((0,), np.uint8), tuple(skipped), tuple(started), error=pixels)
                            return
                        skipped.append(SkippedFile.of(pixels, name))
                        continue
                    read_any = True
                    buffer.append(train_view(pixels, self.size, rng, bool(rng.random() < 0.5)))
                    if len(buffer) >= capacity:
                        picks = sorted(rng.choice(len(buffer), size=size, replace=False).tolist(), reverse=True)
                        yield Batch(np.stack([buffer.pop(i) for i in picks]), tuple(skipped), tuple(started))
                        skipped.clear()
                        started.clear()
            # Under --skip-bad one epoch can hand a reader only damaged shards; several in a row mean no end.
            empty = 0 if read_any or (current == epoch and skip) else empty + 1
            if empty == EMPTY_PASSES:
                reason = f"no readable image samples in {EMPTY_PASSES} passes over this reader's shards ({len(mine)})"
                error = VqtoolError(reason, mine[0] if mine else self.shards[0])
                yield Batch(np.empty((0,), np.uint8), tuple(skipped), tuple(started), error=error)
                return


def _as_is(batch: Batch) -> Batch:
    return batch


# ---- opening --data ---------------------------------------------------------------------------------------


def _read_views(
    items: Iterable[tuple[str, Callable[[], np.ndarray]]], size: int, skipped: list[SkippedFile] | None
) -> np.ndarray:
    views = [
        view
        for _, view in read_each(items, lambda item: val_view(item[1](), size), skipped, file_of=lambda item: item[0])
    ]
    if not views:
        raise VqtoolError("none of the validation images could be read")
    return np.stack(views)


def indexed_set(path: Path) -> ImageSet:
    """A collection training reads by index: a .npy's rows, a list's files or a folder's."""
    if path.suffix.lower() == ".npy":
        return NpySet.of(path)
    if path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        return FileSet(list_file_names(path))
    return FileSet(list_image_names([path]))


def read_validation(spec: str, size: int, max_pixels: int, skipped: list[SkippedFile] | None) -> np.ndarray:
    """Every image of the collection `spec` (at most VALIDATION_MAX, evenly spaced), centre-cropped."""
    path = Path(spec)
    if is_shard_spec(spec):
        samples = (s for shard in expand_shards(spec) for s in shard_images(shard, max_pixels))
        return _read_views(((n, _given(p)) for n, p in itertools.islice(samples, VALIDATION_MAX)), size, skipped)
    if is_cifar_folder(path) or path.suffix.lower() == ".npz":
        train, own_val = read_image_set(path, size, fit=Fit(max_pixels=max_pixels))
        held = own_val if own_val is not None else train
        return held[_evenly(len(held))]
    images = indexed_set(path)
    return _read_views(_readers(images, _evenly(len(images.keys)), max_pixels), size, skipped)


def _evenly(count: int) -> np.ndarray:
    """At most VALIDATION_MAX indices of `count`, evenly spaced."""
    return np.unique(np.linspace(0, count - 1, min(VALIDATION_MAX, count)).round().astype(int))


def _readers(images: ImageSet, indices: np.ndarray, max_pixels: int) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
    """(name, read) for each index: what _read_views takes, reading each image only when asked."""
    for index in indices.tolist():
        yield images.name(index), functools.partial(read_image, images, index, max_pixels)


def _given(pixels: np.ndarray | VqtoolError) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        if isinstance(pixels, VqtoolError):
            raise pixels
        return pixels

    return read


def load_training_set(
    data: Path | str | None,
    size: int,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    skip_bad: bool = False,
    val_data: Path | str | None = None,
    log: Callable[[str], None] = print,
) -> TrainingSet | IndexedSet | ShardSet:
    """The training data a run uses: the embedded photographs, or the collection at `data`, read as it trains.

    Validation images come from `val_data` when given, else from a fixed held-out part of `data` (the
    last shard, for tar shards). With `skip_bad`, unreadable validation files are left out and reported
    through `log`; unreadable training files are skipped (and counted) as training reads them.
    """
    skipped: list[SkippedFile] | None = [] if skip_bad else None
    val = None if val_data is None else read_validation(str(val_data), size, max_pixels, skipped)
    if data is None:
        if val is not None:
            raise VqtoolError("--val-data needs --data: the embedded photographs bring their own validation images")
        return default_training_set(size)
    spec, path = str(data), Path(data)
    result: TrainingSet | IndexedSet | ShardSet
    if is_shard_spec(spec):
        shards = expand_shards(spec)
        if val is None:
            if len(shards) < 2:
                raise VqtoolError("one tar shard: give --val-data, or two shards or more (the last is held out)", spec)
            val, shards = read_validation(shards[-1], size, max_pixels, skipped), shards[:-1]
        result = ShardSet(shards, val, size, max_pixels, skip_bad)
    elif is_cifar_folder(path) or path.suffix.lower() == ".npz":
        pixels, own_val = read_image_set(path, size, fit=Fit(max_pixels=max_pixels))
        result = split_training_set(pixels, size, val if val is not None else own_val)
    else:
        images = indexed_set(path)
        if val is None:
            train, held = held_out_split(len(images.keys))
            val = _read_views(_readers(images, held, max_pixels), size, skipped)
        else:
            train = np.arange(len(images.keys))
        result = IndexedSet(images, train, val, size, skip_bad, max_pixels)
    if skipped:
        log(f"{val_data or data}: validation {describe_skipped(skipped, len(skipped) + len(result.val))}")
    return result

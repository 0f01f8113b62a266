"""WebDataset tar shards: their samples located from the tar headers and read by position, in any order (encode,
either engine) or shard by shard (training). Read with Python's tarfile alone, so the runtime install reads them.

A sample's key follows WebDataset's convention: a member's key is its path up to the first dot of its base name,
so `dir/0001.jpg` and `dir/0001.json` are one sample and `dir/0001.seg.png` is not an image member of it. A
sample's image is its first member among SHARD_IMAGE_MEMBERS.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vqtool.data.refs import TAR_MEMBER, ImageRef, Locators, TarMember
from vqtool.errors import VqtoolError, first_line, missing_extra
from vqtool.images.reading import decode_rgb

SHARD_IMAGE_MEMBERS = ("png", "jpg", "jpeg", "webp")
# WebDataset's split of a member's path into (key, suffix): the key runs to the first dot of the base name.
_KEY_AND_SUFFIX = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


@dataclass(frozen=True)
class TarSet:
    """Samples of WebDataset tar shards, in shard order and member order within each; read by offset."""

    shards: tuple[str, ...]
    sample_keys: Sequence[str]
    shard_of: np.ndarray  # index into shards, per row
    offsets: np.ndarray
    sizes: np.ndarray
    suffixes: Sequence[str]

    @property
    def keys(self) -> Sequence[str]:
        return self.sample_keys

    def name(self, index: int) -> str:
        return f"{self.shards[self.shard_of[index]]}:{self.sample_keys[index]}.{self.suffixes[index]}"

    def refs(self, start: int, stop: int) -> list[ImageRef]:
        stop = min(stop, len(self.sample_keys))
        return [
            TarMember(self.name(i), self.shards[self.shard_of[i]], int(self.offsets[i]), int(self.sizes[i]))
            for i in range(start, stop)
        ]

    def sliced(self, start: int, stop: int) -> TarSet:
        return TarSet(
            self.shards,
            self.sample_keys[start:stop],
            self.shard_of[start:stop],
            self.offsets[start:stop],
            self.sizes[start:stop],
            self.suffixes[start:stop],
        )

    def locators(self) -> Locators:
        count = len(self.sample_keys)
        return Locators(
            np.full(count, TAR_MEMBER, np.int8),
            [self.shards[i] for i in self.shard_of],
            np.asarray(self.offsets, np.int64),
            np.asarray(self.sizes, np.int64),
            [self.name(i) for i in range(count)],
        )


def _shard_samples(shard: str) -> list[tuple[str, str, tarfile.TarInfo]]:
    """(key, image suffix, image member) of each sample of one shard with an image member, in member order."""
    found: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(shard, "r:") as archive:
            for member in archive:
                match = _KEY_AND_SUFFIX.match(member.name) if member.isfile() else None
                if match is not None and match[2].lower() in SHARD_IMAGE_MEMBERS:
                    found.setdefault(match[1], {})[match[2].lower()] = member
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise VqtoolError(f"unreadable tar shard ({first_line(exc)})", shard) from None
    samples = []
    for key, members in found.items():
        suffix = next(s for s in SHARD_IMAGE_MEMBERS if s in members)
        samples.append((key, suffix, members[suffix]))
    return samples


def tar_samples(shards: Sequence[str]) -> TarSet:
    """Every sample with an image member in the shards, located by reading the tar headers only."""
    keys: list[str] = []
    shard_of: list[int] = []
    offsets: list[int] = []
    sizes: list[int] = []
    suffixes: list[str] = []
    for number, shard in enumerate(shards):
        for key, suffix, member in _shard_samples(shard):
            keys.append(key)
            shard_of.append(number)
            offsets.append(member.offset_data)
            sizes.append(member.size)
            suffixes.append(suffix)
    if not keys:
        raise VqtoolError("no samples with an image member (.png, .jpg, .jpeg or .webp) in these tar shards")
    return TarSet(tuple(shards), keys, np.asarray(shard_of, np.int32), np.asarray(offsets), np.asarray(sizes), suffixes)


def read_member(member: TarMember) -> bytes:
    """A member's bytes, read at its offset; a one-line VqtoolError naming it where the shard cannot give them."""
    try:
        descriptor = os.open(member.shard, os.O_RDONLY)
        try:
            data = os.pread(descriptor, member.size, member.offset)
        finally:
            os.close(descriptor)
    except OSError as exc:
        raise VqtoolError(f"cannot read this tar member ({first_line(exc)})", member.name) from None
    if len(data) != member.size:
        raise VqtoolError("the tar shard ends inside this member (truncated)", member.name)
    return data


def shard_images(shard: str, max_pixels: int) -> Iterator[tuple[str, np.ndarray | VqtoolError]]:
    """(name, pixels or the error reading them) for each sample of one shard with an image member, in member order
    (training reads shards so); a shard that cannot be read is one error, under the shard's name."""
    try:
        samples = _shard_samples(shard)
    except VqtoolError as error:
        yield shard, error
        return
    for key, suffix, member in samples:
        ref = TarMember(f"{shard}:{key}.{suffix}", shard, member.offset_data, member.size)
        try:
            yield ref.name, decode_rgb(read_member(ref), ref.name, max_pixels)
        except VqtoolError as error:
            yield ref.name, error


def expand_shards(spec: str) -> list[str]:
    """Shard paths from a brace pattern (`train-{000000..000099}.tar`), a folder of .tar files, or one .tar."""
    path = Path(spec)
    if path.is_dir():
        shards = sorted(str(p) for p in path.glob("*.tar"))
    elif "{" in spec:
        try:
            from braceexpand import braceexpand
        except ModuleNotFoundError:
            raise missing_extra("brace patterns of tar shards", "braceexpand", "train") from None
        shards = list(braceexpand(spec))
    else:
        shards = [spec]
    missing = next((s for s in shards if not os.path.isfile(s)), None)
    if missing is not None:
        raise VqtoolError("no such tar shard", missing)
    if not shards:
        raise VqtoolError("no .tar shards here", spec)
    return shards

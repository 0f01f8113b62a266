"""Deterministic slices of the sorted file list, and merging shard outputs back into one codes file."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vqtool.errors import VqtoolError
from vqtool.formats.atomic import atomic_output, write_json
from vqtool.formats.codes import CodesSidecar, load_codes_array, read_sidecar, sidecar_path
from vqtool.formats.contract import UNRECORDED, Contract, joined
from vqtool.formats.lock import output_lock
from vqtool.formats.outputs import check_codes_output
from vqtool.formats.space import allocated_memmap
from vqtool.images.reading import sorted_names


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """'I/N' with 0 <= I < N."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not match or not 0 <= int(match[1]) < int(match[2]):
            raise VqtoolError(f"--shard takes I/N with 0 <= I < N (I counts from 0), got {text!r}")
        return cls(int(match[1]), int(match[2]))

    def bounds(self, total: int) -> tuple[int, int]:
        """[start, stop) of this shard: contiguous, so shards concatenate into the single-pass order."""
        return self.index * total // self.count, (self.index + 1) * total // self.count

    def record(self, start: int, stop: int, keys: Sequence[str]) -> dict[str, int | str]:
        """What the sidecar says of this shard: where it lies in the full list, and which list that is."""
        return {
            "index": self.index,
            "count": self.count,
            "start": start,
            "stop": stop,
            "total": len(keys),
            "list_sha256": list_checksum(keys),
        }


def list_checksum(files: Sequence[Path | str]) -> str:
    """Identifies the full sorted file list, so shards of different lists are never merged."""
    return hashlib.sha256("\n".join(str(f) for f in files).encode()).hexdigest()


def skipped_files(sidecar: CodesSidecar) -> list[str]:
    return [entry["file"] for entry in sidecar.skipped or []]


def merge_shards(paths: Sequence[Path], out: Path, *, overwrite: bool = False) -> CodesSidecar:
    """Join shard outputs into one codes file + sidecar identical to a single pass, after checking them. An existing
    `out` is replaced only with `overwrite`, and no other run may write `out` meanwhile."""
    if not paths:
        raise VqtoolError("no shard files given")
    if out.suffix.lower() != ".npy":
        raise VqtoolError("merge writes a codes .npy (with its .json sidecar beside it); name it so", out)
    with output_lock(out, sidecar_path(out)):
        check_codes_output(out, overwrite=overwrite, resuming=False)
        return _merge(paths, out)


def _contract(sidecar: CodesSidecar) -> Contract:
    """The contract a shard records; for a shard written before contracts were recorded, one of its own kind."""
    if sidecar.contract is not None:
        return Contract.from_dict(sidecar.contract)
    return Contract(UNRECORDED, sidecar.backend or "unknown", sidecar.precision)


def _merge(paths: Sequence[Path], out: Path) -> CodesSidecar:
    loaded = []
    for path in paths:
        sidecar = read_sidecar(path)
        if sidecar is None:
            raise VqtoolError("has no sidecar (.json) beside it; merge needs the shard outputs of vqtool encode", path)
        if sidecar.shard is None:
            raise VqtoolError("is not a shard (it was encoded without --shard)", path)
        loaded.append((path, sidecar))
    first_path, first = loaded[0]
    assert first.shard is not None  # every sidecar was checked to be a shard's above
    count = int(first.shard["count"])
    first_contract = _contract(first)
    for path, sidecar in loaded[1:]:
        if sidecar.manifest_sha256 != first.manifest_sha256:
            raise VqtoolError(
                f"was made by another export (manifest {sidecar.manifest_sha256[:12]}) than {first_path} "
                f"(manifest {first.manifest_sha256[:12]})",
                path,
            )
        for field in ("checkpoint_sha256", "grid", "dtype", "codes", "precision"):
            if getattr(sidecar, field) != getattr(first, field):
                raise VqtoolError(f"was made with a different {field} than {first_path}", path)
        if _contract(sidecar).key != first_contract.key:
            raise VqtoolError(
                f"was made under the {_contract(sidecar).key} contract, {first_path} under the {first_contract.key} "
                "one: codes of two contracts are never joined",
                path,
            )
        assert sidecar.shard is not None and first.shard is not None
        for field in ("count", "total", "list_sha256"):
            if sidecar.shard[field] != first.shard[field]:
                raise VqtoolError(f"belongs to a different sharding ({field} differs from {first_path})", path)
    by_index: dict[int, tuple[Path, CodesSidecar]] = {}
    for path, sidecar in loaded:
        assert sidecar.shard is not None
        index = int(sidecar.shard["index"])
        if index in by_index:
            raise VqtoolError(f"shard {index}/{count} is given twice (also {by_index[index][0]})", path)
        by_index[index] = (path, sidecar)
    missing = sorted(set(range(count)) - set(by_index))
    if missing:
        raise VqtoolError(f"shards {', '.join(f'{i}/{count}' for i in missing)} are missing; merge needs all {count}")
    ordered = [by_index[i] for i in range(count)]
    files = [f for _, sidecar in ordered for f in sidecar.files]
    # Under --skip-bad a shard's rows leave its unreadable files out; its slice of the list is both, in order.
    sliced = [f for _, sidecar in ordered for f in sorted_names([*sidecar.files, *skipped_files(sidecar)])]
    if list_checksum(sliced) != first.shard["list_sha256"]:
        raise VqtoolError("the shards' file lists do not add up to the list they were cut from")
    skipped = [entry for _, sidecar in ordered for entry in sidecar.skipped or []]
    arrays = []
    for path, sidecar in ordered:
        codes = load_codes_array(path)
        if codes.shape[1:] != tuple(sidecar.grid) or codes.dtype != np.dtype(sidecar.dtype):
            raise VqtoolError(f"holds {codes.dtype} grids of {codes.shape[1:]}, not what its sidecar says", path)
        if len(codes) != len(sidecar.files):
            raise VqtoolError(f"holds {len(codes)} grids but its sidecar lists {len(sidecar.files)} files", path)
        arrays.append(codes)
    merged = CodesSidecar(
        files=files,
        grid=first.grid,
        codes=first.codes,
        dtype=first.dtype,
        manifest_sha256=first.manifest_sha256,
        checkpoint_sha256=first.checkpoint_sha256,
        precision=first.precision,
        skipped=skipped if any(sidecar.skipped is not None for _, sidecar in ordered) else None,
        backend=backends.pop() if len(backends := {s.backend for _, s in ordered}) == 1 else "mixed",
        contract=joined([_contract(s) for _, s in ordered], "the shards").to_dict() if first.contract else None,
    )
    with atomic_output(out) as temp:
        target = allocated_memmap(temp, np.dtype(first.dtype), (len(files), *first.grid), shown=out)
        row = 0
        for codes in arrays:
            target[row : row + len(codes)] = codes
            row += len(codes)
        target.flush()
        del target
        write_json(sidecar_path(out), merged.to_dict())
    return merged

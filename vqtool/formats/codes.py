"""codes.npy and its sidecar (codes.json): which files, in which order, encoded by which model."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from vqtool.errors import VqtoolError, first_line
from vqtool.formats.manifest import CODE_DTYPES, Manifest

SIDECAR_FORMAT = "vqtool.codes"


def sidecar_path(codes_path: Path) -> Path:
    """codes.npy -> codes.json, beside it."""
    return codes_path.with_suffix(".json")


@dataclass(frozen=True)
class CodesSidecar:
    """What a codes file holds: source files in row order and the model that made the codes."""

    files: list[str]
    grid: list[int]
    codes: int
    dtype: str
    manifest_sha256: str
    checkpoint_sha256: str
    # For a shard: index, count, start, stop, total and list_sha256 of the full sorted list; None for a full pass.
    shard: dict[str, int | str] | None = None
    # The encoder graph's precision: INT8 codes may differ from FP32 ones, so they are never mixed.
    precision: str = "fp32"
    # With --skip-bad: [{"file": ..., "reason": ...}] for each file left out (`files` lists the rows only).
    skipped: list[dict[str, str]] | None = None
    # The runtime that ran the encoder (onnxruntime, openvino, tensorrt, torch); "mixed" for shards of several.
    # Absent from files written before it was recorded.
    backend: str | None = None
    # The contract the codes were made under (vqtool.formats.contract.Contract): exact, bounded, none or unchecked,
    # with the runtime, precision and the drift parity measured. Absent from files written before it was recorded.
    contract: dict[str, Any] | None = None
    format: str = SIDECAR_FORMAT

    def to_dict(self) -> dict[str, object]:
        # Shallow: asdict deep-copies every file name, a visible share of encoding small images.
        raw = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.skipped is None:  # a run without --skip-bad writes the sidecar it always wrote
            del raw["skipped"]
        for optional in ("backend", "contract"):
            if raw[optional] is None:
                del raw[optional]
        return raw


def _is_str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _sidecar_problem(raw: dict[str, Any]) -> str | None:
    """What is wrong with a parsed sidecar's fields, or None: a hand-edited or half-written file says so here."""
    if not _is_str_list(raw.get("files")):
        return "'files' must be a list of file names"
    grid = raw.get("grid")
    if not (isinstance(grid, list) and len(grid) == 2 and all(type(v) is int and v > 0 for v in grid)):
        return "'grid' must be two positive integers"
    if type(raw.get("codes")) is not int or raw["codes"] < 2:
        return "'codes' must be an integer of at least 2"
    if not isinstance(raw.get("backend", ""), str):
        return "'backend' must be a string"
    for name in ("dtype", "manifest_sha256", "checkpoint_sha256", "precision"):
        if not isinstance(raw.get(name, ""), str):
            return f"'{name}' must be a string"
    if raw.get("dtype") not in CODE_DTYPES:
        return f"'dtype' must be one of {', '.join(CODE_DTYPES)}"
    contract = raw.get("contract")
    if contract is not None and not (
        isinstance(contract, dict) and all(isinstance(contract.get(k), str) for k in ("name", "backend", "precision"))
    ):
        return "'contract' must hold name, backend and precision"
    shard = raw.get("shard")
    shard_fields = ("index", "count", "start", "stop", "total")
    if shard is not None and not (
        isinstance(shard, dict)
        and all(type(shard.get(k)) is int for k in shard_fields)
        and isinstance(shard.get("list_sha256"), str)
    ):
        return "'shard' must hold index, count, start, stop, total and list_sha256"
    skipped = raw.get("skipped")
    if skipped is not None and not (
        isinstance(skipped, list)
        and all(isinstance(e, dict) and _is_str_list([e.get("file"), e.get("reason")]) for e in skipped)
    ):
        return "'skipped' must be a list of {file, reason}"
    return None


def sidecar_from(raw: object) -> CodesSidecar:
    """A sidecar from its parsed JSON (codes.json, or a codes.parquet's metadata); ValueError says what is wrong."""
    if not isinstance(raw, dict) or raw.get("format") != SIDECAR_FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"format is {found!r}, not {SIDECAR_FORMAT!r}")
    problem = _sidecar_problem(raw)
    if problem:
        raise ValueError(problem)
    return CodesSidecar(**raw)


def read_sidecar(codes_path: Path) -> CodesSidecar | None:
    path = sidecar_path(codes_path)
    if not path.exists():
        return None
    try:
        return sidecar_from(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError, TypeError, ValueError) as exc:
        raise VqtoolError(f"corrupt codes sidecar ({exc})", path) from None


def load_codes_array(path: Path) -> np.ndarray:
    """A codes .npy, memory-mapped and never unpickled: integers shaped N x h x w (one h x w grid is N = 1)."""
    try:
        codes = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise VqtoolError("no such codes file", path) from None
    except Exception as exc:
        # A damaged header reaches NumPy's parser (tokenize, ast): EOFError, TokenError, SyntaxError... besides
        # the OSError and ValueError of unreadable or pickled files. Each means this is no codes file.
        reason = first_line(exc)
        raise VqtoolError(f"not a readable .npy codes file ({reason})", path) from None
    if not isinstance(codes, np.ndarray) or not np.issubdtype(codes.dtype, np.integer):
        raise VqtoolError(f"codes must be integers, got {getattr(codes, 'dtype', type(codes).__name__)}", path)
    if codes.ndim == 2:
        codes = codes[None]
    if codes.ndim != 3 or 0 in codes.shape:
        raise VqtoolError(f"codes must be shaped N x h x w, got {codes.shape}", path)
    return np.asarray(codes)


def read_codes(path: Path, manifest: Manifest) -> tuple[np.ndarray, CodesSidecar | None]:
    """Codes N x h x w (memory-mapped), checked against the model that will decode them."""
    codes = load_codes_array(path)
    sidecar = read_sidecar(path)
    check_codes(path, manifest, sidecar, len(codes), [codes])
    return codes, sidecar


def check_codes(
    path: Path, manifest: Manifest, sidecar: CodesSidecar | None, count: int, runs: Iterable[np.ndarray]
) -> None:
    """Codes made by this model, as many as their file list says, each within 0..K-1 (`runs`: the grids, in parts)."""
    if sidecar is not None and sidecar.checkpoint_sha256 != manifest.checkpoint_sha256:
        raise VqtoolError(
            f"codes were made by another model (sidecar model {sidecar.checkpoint_sha256[:12]}, "
            f"this export {manifest.checkpoint_sha256[:12]}); decode them with the export that made them",
            path,
        )
    if sidecar is not None and len(sidecar.files) != count:
        raise VqtoolError(f"sidecar lists {len(sidecar.files)} files but the codes hold {count} grids", path)
    first = 0
    for codes in runs:
        if not codes.size:
            continue
        low, high = int(codes.min()), int(codes.max())
        if low < 0 or high >= manifest.codes:
            bad = low if low < 0 else high
            index = tuple(int(i) for i in np.argwhere(codes == bad)[0])
            index = (index[0] + first, *index[1:])
            raise VqtoolError(f"code {bad} at index {index} is outside 0..{manifest.codes - 1} for this model", path)
        first += len(codes)

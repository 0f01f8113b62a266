"""codes.npy and its sidecar (codes.json): which files, in which order, encoded by which model."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from vqtool.errors import VqtoolError
from vqtool.manifest import Manifest

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
    format: str = SIDECAR_FORMAT

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def read_sidecar(codes_path: Path) -> CodesSidecar | None:
    path = sidecar_path(codes_path)
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
        if raw.get("format") != SIDECAR_FORMAT:
            raise ValueError(f"format is {raw.get('format')!r}, not {SIDECAR_FORMAT!r}")
        return CodesSidecar(**raw)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError, AttributeError) as exc:
        raise VqtoolError(f"corrupt codes sidecar ({exc})", path) from None


def read_codes(path: Path, manifest: Manifest) -> tuple[np.ndarray, CodesSidecar | None]:
    """Codes N x h x w (memory-mapped), checked against the model that will decode them."""
    try:
        codes = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise VqtoolError("no such codes file", path) from None
    except (OSError, ValueError) as exc:
        raise VqtoolError(f"not a readable .npy codes file ({exc})", path) from None
    if not isinstance(codes, np.ndarray) or not np.issubdtype(codes.dtype, np.integer):
        raise VqtoolError(f"codes must be integers, got {getattr(codes, 'dtype', type(codes).__name__)}", path)
    if codes.ndim == 2:
        codes = codes[None]
    if codes.ndim != 3 or codes.shape[0] == 0:
        raise VqtoolError(f"codes must be shaped N x h x w, got {codes.shape}", path)
    sidecar = read_sidecar(path)
    if sidecar is not None and sidecar.checkpoint_sha256 != manifest.checkpoint_sha256:
        raise VqtoolError(
            f"codes were made by another model (sidecar model {sidecar.checkpoint_sha256[:12]}, "
            f"this export {manifest.checkpoint_sha256[:12]}); decode them with the export that made them",
            path,
        )
    if sidecar is not None and len(sidecar.files) != len(codes):
        raise VqtoolError(f"sidecar lists {len(sidecar.files)} files but the codes hold {len(codes)} grids", path)
    low, high = int(codes.min()), int(codes.max())
    if low < 0 or high >= manifest.codes:
        bad = low if low < 0 else high
        index = tuple(int(i) for i in np.argwhere(codes == bad)[0])
        raise VqtoolError(f"code {bad} at index {index} is outside 0..{manifest.codes - 1} for this model", path)
    return codes, sidecar

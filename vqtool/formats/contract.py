"""The contract codes were made under, as every output records it: which runtime and precision ran, whether parity
found its codes exact or within the bounded contract (or never checked them), and the drift figures it measured.

Codes from two contracts are never joined: merge and --resume refuse it. Codes of the exact contract are the same
whichever runtime made them, so exact codes from ONNX Runtime and OpenVINO join; bounded codes join only with codes
of the same runtime and precision.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vqtool.errors import VqtoolError
from vqtool.formats.records import read_parity_reports, runtime_record
from vqtool.precisions import EXACT_CONTRACT, FP32

UNCHECKED = "unchecked"  # no parity report for this runtime and precision: nothing is promised
UNRECORDED = "unrecorded"  # codes written by a vqtool that did not record contracts
REFERENCE = "torch"  # PyTorch on the CPU is what parity compares against: its FP32 codes are exact by definition


@dataclass(frozen=True)
class Contract:
    """`name`: exact, bounded, none (parity refused it; it runs only where asked for), unchecked, or unrecorded
    (codes written before contracts were); `backend`, `provider` and `precision`: what ran; the figures parity
    measured on `parity_images` images (None where unchecked): the share of codes identical to PyTorch's, the
    changed codes' regret p99 and largest rank, and the PSNR of their decode against the exact codes' (None:
    nothing changed, or no decoder), and `parity_cpu`, the CPU they were measured on (None where unrecorded)."""

    name: str
    backend: str
    precision: str
    provider: str = ""
    identical_fraction: float | None = None
    regret_p99: float | None = None
    rank_max: int | None = None
    drift_psnr: float | None = None
    parity_images: int | None = None
    parity_cpu: str | None = None

    @property
    def key(self) -> str:
        """What two outputs must share to be joined: the contract, and for any but exact the runtime too."""
        return EXACT_CONTRACT if self.name == EXACT_CONTRACT else f"{self.name} ({self.backend} {self.precision})"

    def describe(self) -> str:
        """One phrase for summaries: the contract and, where parity measured it, its figures."""
        if self.name == UNCHECKED:
            return f"unchecked contract ({self.backend} {self.precision} has no parity report for this export)"
        if self.identical_fraction is None or self.identical_fraction == 1.0:
            return f"{self.name} contract"
        figures = f"{self.identical_fraction:.2%} of codes as PyTorch's"
        if self.regret_p99 is not None:
            figures += f", regret p99 {self.regret_p99:.3g}, rank at most {self.rank_max}"
        if self.drift_psnr is not None:
            figures += f", decode {self.drift_psnr:.1f} dB from the exact codes'"
        return f"{self.name} contract ({figures})"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Contract:
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})


def contract_of(export_dir: Path, backend: str, precision: str, provider: str = "") -> Contract:
    """The contract parity.json records for this runtime (`provider` narrows it where given) and precision."""
    if backend == REFERENCE and precision == FP32 and provider.endswith("on cpu"):
        return Contract(EXACT_CONTRACT, backend, precision, provider, identical_fraction=1.0)
    report = runtime_record(read_parity_reports(export_dir), backend, precision, provider)
    if report is not None:
        return Contract(
            report.met,
            backend,
            precision,
            report.provider,
            identical_fraction=report.identical_fraction,
            regret_p99=report.regret_p99 if report.identical < report.codes else None,
            rank_max=report.rank_max if report.identical < report.codes else None,
            drift_psnr=None if math.isinf(report.drift_psnr) else report.drift_psnr,
            parity_images=report.images,
            parity_cpu=report.cpu or None,
        )
    return Contract(UNCHECKED, backend, precision, provider)


def joined(contracts: list[Contract], what: str) -> Contract:
    """The one contract of codes made in parts (shards, resumed runs, Ray blocks); a VqtoolError naming both where
    two differ (`what` says what the parts are)."""
    first = contracts[0]
    for other in contracts[1:]:
        if other.key != first.key:
            raise VqtoolError(f"{what} were made under different contracts: {first.key} and {other.key}")
    if first.name == EXACT_CONTRACT and len({c.backend for c in contracts}) > 1:
        return Contract(EXACT_CONTRACT, "mixed", first.precision, identical_fraction=1.0)
    return first

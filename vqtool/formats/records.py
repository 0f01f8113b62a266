"""parity.json and bench.json: the records an export folder keeps of how its runtimes compare and how fast they run.

`vqtool export` and `vqtool parity` write parity.json, `vqtool bench` writes bench.json; `auto` and BF16's check
read them back here, as typed records. A file that is missing or unreadable reads as no record, and a field a
record lacks (written by hand, or by an older vqtool) takes its default.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from vqtool.formats.manifest import BENCH_NAME, PARITY_NAME
from vqtool.precisions import BOUNDED_CONTRACT, EXACT_CONTRACT, NO_CONTRACT, TABLE

R = TypeVar("R")
# A runtime's record of parity.json: a ParityReport or a LatentReport.
Record = TypeVar("Record", "ParityReport", "LatentReport")
# How a record's failures name the bounded contract's misses (after the exact rule's, which are why it was tried).
BOUNDED_MISS = "bounded: "


@dataclass(frozen=True)
class Drift:
    """How far a runtime's codes moved from the exact ones (measured by export/drift.py): the changed codes' regret
    and rank (p50, p99, max; 0 where none changed), the PSNR of their decode against the exact codes' (inf: none
    changed, or no decoder; stored as null), and for a model vqtool trained, the change in PSNR against the images."""

    regret_p50: float = 0.0
    regret_p99: float = 0.0
    regret_max: float = 0.0
    rank_p50: float = 0.0
    rank_p99: float = 0.0
    rank_max: int = 0
    drift_psnr: float = math.inf
    quality_change_db: float | None = None


@dataclass(frozen=True, kw_only=True)
class ParityReport(Drift):
    """Agreement of one runtime (backend + precision) with the PyTorch model, on a set of images, and its drift."""

    runtime: str
    provider: str = ""
    precision: str = ""
    # The CPU it was measured on (vqtool.host.cpu_description): reduced precisions round by its instructions (AMX,
    # AVX-512 BF16, VNNI), so a drift measured on one CPU family is a measurement of that family.
    cpu: str = ""
    images: int = 0
    codes: int = 0
    identical: int = 0
    near_ties: int = 0
    unexplained: int = 0
    max_gap_rtol: float = 0.0
    recon_max_abs: int = 0
    recon_mean_abs: float = 0.0
    recon_psnr: float = math.inf  # against PyTorch's reconstructions; stored as null when they are equal
    quality_drop_db: float = 0.0  # PSNR against the input images: PyTorch's reconstructions minus these
    decoded: str = "pytorch"  # whose codes the reconstructions come from: "pytorch" or "own"
    # Batch invariance: the sizes the first images were also encoded at, the lowest share of their codes identical
    # to the parity run's, and the differences that are not near-ties.
    batch_sizes: tuple[int, ...] = ()
    batch_identical: float = 1.0
    batch_unexplained: int = 0
    # The contract met: "exact" (the precision's own rule), "bounded", or "none" ("" in records older than it).
    contract: str = ""
    failures: tuple[str, ...] = ()  # why no contract was met
    outside_exact: tuple[str, ...] = ()  # under the bounded contract: why the exact rule was not met
    # Kept as read where `codes` is unknown (a record written by hand); computed otherwise.
    recorded_identical_fraction: float | None = None

    @property
    def identical_fraction(self) -> float:
        if self.codes:
            return self.identical / self.codes
        return self.recorded_identical_fraction or 0.0

    @property
    def exact(self) -> bool:
        """Every code identical to PyTorch's."""
        return self.passed and self.codes > 0 and self.identical == self.codes

    @property
    def passed(self) -> bool:
        """Whether it met a contract (exact or bounded)."""
        return not self.failures

    @property
    def first_failure(self) -> str:
        """The reason to give first: the bounded contract's miss where that was tried (missing the exact rule is only
        why it was), else the first miss of the exact rule; "" where it passed."""
        bounded = [f for f in self.failures if f.startswith(BOUNDED_MISS)]
        return (bounded or [*self.failures, ""])[0]

    @property
    def met(self) -> str:
        """The contract met: the record's, or for a record older than contracts, the one its pass stood for; none
        where the record has failures or names no known contract. (Read back, a record claims no more than its
        figures meet: from_dict.)"""
        if not self.passed or self.contract not in ("", EXACT_CONTRACT, BOUNDED_CONTRACT):
            return NO_CONTRACT
        known = TABLE.get(self.precision)
        exact_possible = known is None or known.rule.exact  # INT8's rule cannot be exact: bounded at best
        return EXACT_CONTRACT if self.contract != BOUNDED_CONTRACT and exact_possible else BOUNDED_CONTRACT

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update((f.name, out.pop(f.name)) for f in fields(Drift))  # after the agreement figures
        del out["recorded_identical_fraction"]
        out["failures"] = list(self.failures)
        out["outside_exact"] = list(self.outside_exact)
        out["batch_sizes"] = list(self.batch_sizes)
        out["identical_fraction"] = self.identical_fraction
        out["passed"] = self.passed
        out["contract"] = self.met
        for name in ("recon_psnr", "drift_psnr"):
            out[name] = None if math.isinf(getattr(self, name)) else getattr(self, name)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ParityReport:
        values = _known(cls, raw)
        values["failures"] = tuple(str(f) for f in raw.get("failures") or ())
        values["outside_exact"] = tuple(str(f) for f in raw.get("outside_exact") or ())
        values["batch_sizes"] = tuple(int(b) for b in raw.get("batch_sizes") or ())
        if raw.get("passed") is False and not values["failures"]:
            values["failures"] = ("failed",)
        for name in ("recon_psnr", "drift_psnr"):
            if values.get(name) is None:
                values[name] = math.inf
        values["recorded_identical_fraction"] = raw.get("identical_fraction")
        return _no_more_than_its_figures(cls(**values))


# Contracts, worst first: a record is never read as meeting a better one than its figures do.
CONTRACT_RANK = {NO_CONTRACT: 0, BOUNDED_CONTRACT: 1, EXACT_CONTRACT: 2}


def judged(report: ParityReport, min_identical: float = 0.0) -> ParityReport:
    """`report` with the contract its figures meet under its precision's rules (the precision table's): the exact
    rule, else the bounded contract (asking at least `min_identical` of the codes to be identical), else none, and
    why. Parity judges what it measured with it; a record read back is held to it."""
    row = TABLE[report.precision]
    outside = (
        row.rule.missed(
            identical=report.identical_fraction,
            unexplained=report.unexplained,
            batch_unexplained=report.batch_unexplained,
            recon_max_abs=report.recon_max_abs,
            recon_psnr=report.recon_psnr,
            quality_drop_db=report.quality_drop_db,
        )
        if row.rule.exact
        else [f"{row.name} has no exact contract"]
    )
    if not outside:
        return replace(report, contract=EXACT_CONTRACT, failures=(), outside_exact=())
    if row.bounded is None:
        return replace(report, contract=NO_CONTRACT, failures=tuple(outside), outside_exact=())
    rule = replace(row.bounded, min_identical=min_identical)
    beyond = rule.missed(report.identical_fraction, report.regret_p99, report.rank_max, report.drift_psnr)
    if not beyond:
        return replace(report, contract=BOUNDED_CONTRACT, failures=(), outside_exact=tuple(outside))
    failures = (*outside, *(f"{BOUNDED_MISS}{b}" for b in beyond))
    return replace(report, contract=NO_CONTRACT, failures=failures, outside_exact=())


def _no_more_than_its_figures(report: ParityReport) -> ParityReport:
    """A record read back as it claims, unless its own figures meet a lesser contract under today's rules: then as
    they do (parity.json is read as written, by hand or by a vqtool whose rules were looser)."""
    if not _figures_are_numbers(report):  # a figure written as null or text: nothing to hold a claim to, or to show
        cleared: dict[str, Any] = {
            field.name: field.default for field in fields(ParityReport) if field.name in _FIGURES
        }
        failures = ("its figures are not all numbers",)
        return replace(report, **cleared, recorded_identical_fraction=None, contract=NO_CONTRACT, failures=failures)
    if report.precision not in TABLE or not report.passed:
        return report
    if not report.codes and report.recorded_identical_fraction is None:
        return report  # no count of identical codes to judge by (a record written by hand)
    held = judged(report)
    return report if CONTRACT_RANK[held.met] >= CONTRACT_RANK[report.met] else held


# A record's figures: the fields that are numbers by default (the optional ones, null by default, may stay null).
_FIGURES = tuple(f.name for f in fields(ParityReport) if type(f.default) in (int, float))


def _figures_are_numbers(report: ParityReport) -> bool:
    """Every figure a number, and the recorded share of identical codes too where there is one."""
    names = _FIGURES if report.recorded_identical_fraction is None else (*_FIGURES, "recorded_identical_fraction")
    return all(type(getattr(report, name)) in (int, float) for name in names)


@dataclass(frozen=True)
class LatentReport:
    """The latent graphs (export --latents) of one runtime and precision against the model's own code in PyTorch
    (an imported model's: its library's): the encoder's latents (largest difference over the latents' largest
    magnitude) and the decoder's pictures from PyTorch's latents (PSNR against PyTorch's decode, decoding as
    `decode` says). Each graph meets its rule or not on its own: `encoder_failures` and `decoder_failures` say why
    not."""

    runtime: str
    provider: str = ""
    precision: str = ""
    decode: str = ""
    images: int = 0
    latent_error: float = 0.0
    decode_psnr: float = math.inf  # stored as null when the pictures are equal
    encoder_failures: tuple[str, ...] = ()
    decoder_failures: tuple[str, ...] = ()

    @property
    def failures(self) -> tuple[str, ...]:
        return self.encoder_failures + self.decoder_failures

    @property
    def passed(self) -> bool:
        return not self.failures

    def failures_of(self, role: str) -> tuple[str, ...]:
        """Why this graph ("encoder_latents" or "decoder_latents") missed its rule; empty where it met it."""
        return self.encoder_failures if role == "encoder_latents" else self.decoder_failures

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for name in ("encoder_failures", "decoder_failures", "failures"):
            out[name] = list(getattr(self, name))
        out["decode_psnr"] = None if math.isinf(self.decode_psnr) else self.decode_psnr
        out["passed"] = self.passed
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LatentReport:
        values = _known(cls, raw)
        for name in ("encoder_failures", "decoder_failures"):
            # A record without them (older, or written by hand) holds both graphs to its one list.
            values[name] = tuple(str(f) for f in raw.get(name, raw.get("failures")) or ())
        if values.get("decode_psnr") is None:
            values["decode_psnr"] = math.inf
        read = cls(**values)
        row = TABLE.get(read.precision)
        if row is None or row.latents is None:
            return read
        # Held to today's rule, as a ParityReport is: a graph whose figures miss it is refused, whatever it says.
        return replace(
            read,
            encoder_failures=read.encoder_failures or tuple(row.latents.encoder_missed(read.latent_error)),
            decoder_failures=read.decoder_failures or tuple(row.latents.decoder_missed(read.decode_psnr)),
        )


@dataclass(frozen=True)
class ModelRow:
    """One model-only timing of bench.json: a stage of one runtime at one precision and batch."""

    stage: str
    backend: str
    provider: str = ""
    precision: str = ""
    batch: int = 0
    images_per_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    vs_baseline: float | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelRow:
        """A row as bench.json holds it; a field of another type (text where a number belongs) raises TypeError."""
        row = cls(**_known(cls, raw))
        numbers = (row.images_per_s, row.p50_ms, row.p99_ms, *(() if row.vs_baseline is None else (row.vs_baseline,)))
        texts = (row.stage, row.backend, row.provider, row.precision)
        if type(row.batch) is not int or any(type(n) not in (int, float) for n in numbers):
            raise TypeError(f"bench row with a figure that is not a number: {raw}")
        if not all(isinstance(t, str) for t in texts):
            raise TypeError(f"bench row with a name that is not text: {raw}")
        return row


def _known(cls: type[R], raw: dict[str, Any]) -> dict[str, Any]:
    return {f.name: raw[f.name] for f in fields(cls) if f.name in raw}  # type: ignore[arg-type]


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or {} where it is missing, unreadable, nested past the parser's depth or not an
    object: a record that cannot be read claims nothing."""
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):  # RecursionError: nesting deeper than the parser goes
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _entries(cls: Any, items: Any) -> list[Any]:
    """The well-formed entries of a record's list; a malformed one is passed over, as a missing one would be."""
    out = []
    for item in items if isinstance(items, list) else []:
        try:
            out.append(cls.from_dict(item))
        except (TypeError, ValueError, AttributeError):
            continue
    return out


def read_parity_reports(export_dir: Path) -> list[ParityReport]:
    """Every report of the export's parity.json, or none where it is missing or unreadable."""
    return _entries(ParityReport, read_json_object(export_dir / PARITY_NAME).get("reports"))


def read_latent_reports(export_dir: Path) -> list[LatentReport]:
    """The latent graphs' reports of the export's parity.json, or none."""
    return _entries(LatentReport, read_json_object(export_dir / PARITY_NAME).get("latents"))


def runtime_record(reports: Iterable[Record], runtime: str, precision: str, provider: str = "") -> Record | None:
    """The record of this runtime and precision among `reports` (`provider` narrows it where given, and a record
    that names none speaks for every provider of its runtime), if any."""
    for report in reports:
        if (report.runtime, report.precision) != (runtime, precision):
            continue
        if provider in ("", report.provider) or not report.provider:
            return report
    return None


def parity_report(export_dir: Path, runtime: str, precision: str) -> ParityReport | None:
    """This runtime's report in parity.json (written by export and by `vqtool parity`), if any."""
    return runtime_record(read_parity_reports(export_dir), runtime, precision)


def read_bench_rows(export_dir: Path) -> list[ModelRow]:
    """The model-only timings of the export's bench.json, or none where it is missing or unreadable."""
    return _entries(ModelRow, read_json_object(export_dir / BENCH_NAME).get("model_only"))

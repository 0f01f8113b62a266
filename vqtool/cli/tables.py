"""Tables the CLI prints (torch-free: they read plain dicts)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from rich.markup import escape
from rich.table import Table


def _decibels(value: float | None, same: str) -> str:
    return same if value is None or math.isinf(value) else f"{value:.1f} dB"


def _contract(r: dict[str, Any]) -> str:
    met = r["contract"]
    if met == "none":
        return "[red]none: " + escape("; ".join(r["failures"])) + "[/]"
    return f"[green]{met}[/]" if met == "exact" else f"[yellow]{met}[/]"


def _runtime(r: dict[str, Any]) -> str:
    return f"{r['runtime']} ({r['provider'].removesuffix('ExecutionProvider')})"


def parity_table(reports: Sequence[dict[str, Any]]) -> Table:
    """One row per runtime and precision, as parity.json records them: codes against PyTorch's, reconstructions
    against PyTorch's, and the contract met."""
    table = Table(title=f"parity against PyTorch on {reports[0]['images']} images" if reports else "parity")
    for header in (
        "runtime",
        "precision",
        "codes identical",
        "near-ties",
        "unexplained",
        "max |Δ|",
        "mean |Δ|",
        "PSNR",
        "contract",
    ):
        table.add_column(header, justify="left" if header in ("runtime", "precision", "contract") else "right")
    for r in reports:
        table.add_row(
            _runtime(r),
            r["precision"],
            f"{r['identical_fraction']:.4%} ({r['identical']}/{r['codes']})",
            str(r["near_ties"]),
            str(r["unexplained"]),
            str(r["recon_max_abs"]),
            f"{r['recon_mean_abs']:.4f}",
            _decibels(r["recon_psnr"], "identical"),
            _contract(r),
        )
    return table


def drift_table(reports: Sequence[dict[str, Any]]) -> Table:
    """What each runtime's codes change: the share that stays the same under other batch sizes, and the changed
    codes' regret, rank and decode against the exact codes' (and against the images, for a model vqtool trained)."""
    table = Table(title="drift of the codes from PyTorch's (p50 / p99 / max over the changed codes)")
    for header in ("runtime", "precision", "batch-invariant", "regret", "rank", "drift PSNR", "Δ vs images"):
        table.add_column(header, justify="left" if header in ("runtime", "precision") else "right")
    for r in reports:
        changed = r["identical"] < r["codes"]
        quality = r.get("quality_change_db")
        table.add_row(
            _runtime(r),
            r["precision"],
            f"{r.get('batch_identical', 1.0):.2%} ({', '.join(map(str, r['batch_sizes']))})"
            if r.get("batch_sizes")
            else "—",
            " / ".join(f"{r.get(f'regret_{q}', 0.0):.3g}" for q in ("p50", "p99", "max")) if changed else "—",
            " / ".join(f"{r.get(f'rank_{q}', 0):g}" for q in ("p50", "p99", "max")) if changed else "—",
            _decibels(r.get("drift_psnr"), "—"),
            "—" if quality is None else f"{quality:+.2f} dB",
        )
    return table


def bench_table(rows: Sequence[dict[str, Any]]) -> Table:
    """Model-only throughput per backend, precision and batch, with the ratio to PyTorch eager and the contract the
    runtime's codes are published under (parity.json; unchecked where parity never ran it)."""
    table = Table(title="model-only throughput (images/s) and latency")
    numbers = ("batch", "images/s", "p50 ms", "p99 ms", "× eager")
    for header in ("stage", "backend", "precision", *numbers, "contract"):
        table.add_column(header, justify="right" if header in numbers else "left")
    for r in rows:
        ratio = r["vs_baseline"]
        table.add_row(
            r["stage"],
            f"{r['backend']} ({r['provider'].removesuffix('ExecutionProvider')})",
            r["precision"],
            str(r["batch"]),
            f"{r['images_per_s']:,.0f}",
            f"{r['p50_ms']:.2f}",
            f"{r['p99_ms']:.2f}",
            "—" if ratio is None else f"{ratio:.2f}×",
            r.get("contract", "—"),
        )
    return table


def folder_table(results: Sequence[dict[str, Any]]) -> Table:
    """End-to-end folder encode per precision, against the naive script and against each stage alone."""
    count = int(results[0]["images"]) if results else 0
    table = Table(title=f"end-to-end encode of {count} image files on the CPU (images/s)")
    headers = (
        "runtime",
        "precision",
        "vqtool encode",
        "naive script",
        "× naive",
        "read only",
        "model only (all cores)",
        "÷ slower stage",
        "÷ sharing bound",
    )
    for header in headers:
        table.add_column(header, justify="left" if header in ("runtime", "precision") else "right")
    for r in results:
        table.add_row(
            r.get("backend", "onnxruntime"),
            r["precision"],
            f"{r['pipeline_images_per_s']:,.0f}",
            f"{r['naive_images_per_s']:,.0f}",
            f"{r['vs_naive']:.2f}×",
            f"{r['read_only_images_per_s']:,.0f} ({r['readers']} proc)",
            f"{r['model_only_images_per_s']:,.0f}",
            f"{r['vs_slower_stage']:.0%}",
            f"{r['vs_sharing_bound']:.0%}",
        )
    return table

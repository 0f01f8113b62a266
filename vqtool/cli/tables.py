"""Tables the CLI prints (torch-free: they read plain dicts)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from rich.markup import escape
from rich.table import Table


def parity_table(reports: Sequence[dict[str, Any]]) -> Table:
    """One row per runtime and precision, as parity.json records them."""
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
        "result",
    ):
        table.add_column(header, justify="left" if header in ("runtime", "precision", "result") else "right")
    for r in reports:
        psnr = r["recon_psnr"]
        table.add_row(
            f"{r['runtime']} ({r['provider'].removesuffix('ExecutionProvider')})",
            r["precision"],
            f"{r['identical_fraction']:.4%} ({r['identical']}/{r['codes']})",
            str(r["near_ties"]),
            str(r["unexplained"]),
            str(r["recon_max_abs"]),
            f"{r['recon_mean_abs']:.4f}",
            "identical" if psnr is None or math.isinf(psnr) else f"{psnr:.1f} dB",
            "[green]pass[/]" if r["passed"] else "[red]FAIL: " + escape("; ".join(r["failures"])) + "[/]",
        )
    return table


def bench_table(rows: Sequence[dict[str, Any]]) -> Table:
    """Model-only throughput per backend, precision and batch, with the ratio to PyTorch eager."""
    table = Table(title="model-only throughput (images/s) and latency")
    for header in ("stage", "backend", "precision", "batch", "images/s", "p50 ms", "p99 ms", "× eager"):
        table.add_column(
            header, justify="right" if header in ("batch", "images/s", "p50 ms", "p99 ms", "× eager") else "left"
        )
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

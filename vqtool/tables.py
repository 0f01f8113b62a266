"""Tables the CLI prints (torch-free: they read plain dicts)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from rich.markup import escape
from rich.table import Table


def parity_table(reports: Sequence[dict[str, Any]]) -> Table:
    """One row per runtime and precision, as parity.json records them."""
    table = Table(title=f"parity against PyTorch on {reports[0]['images']} held-out images" if reports else "parity")
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

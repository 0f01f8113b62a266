"""The runtimes a parity check walks: every row of the runtime table, at each precision the table says it runs and
the caller wants, whose graphs start here; started for the graphs the check needs and closed after it. The codes'
parity (export/parity.py) and the latent graphs' (export/latents.py) walk them alike."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from vqtool.errors import VqtoolError
from vqtool.formats.manifest import Manifest
from vqtool.host import nvidia_gpu_present
from vqtool.runtime.base import RUNTIMES, Runner, is_reference, runs
from vqtool.runtime.select import open_runner

# The graphs a check needs at a precision, as (role, the precision it runs at); None for one the export lacks.
GraphsAt = Callable[[str], tuple[tuple[str, str] | None, ...]]


@dataclass(frozen=True)
class Started:
    """One runtime at one precision, with a runner for each graph asked (None where the export lacks it)."""

    backend: str
    device: str
    precision: str
    runners: tuple[Runner | None, ...]


def started_runtimes(
    export_dir: Path,
    manifest: Manifest,
    graphs_at: GraphsAt,
    *,
    precisions: tuple[str, ...],
    wanted: Callable[[str, str, str], bool],
    backends: tuple[str, ...] | None = None,
    skipped: list[str] | None = None,
) -> Iterator[Started]:
    """Each runtime (`backends` limit which) at each of `precisions` it runs for which `wanted(backend, device,
    precision)` holds, but the reference itself (PyTorch's FP32 on the CPU), its graphs started unrefused: a runtime
    an earlier parity.json refused is measured afresh.
    One that does not start here is left out, and said in `skipped` where given: the CUDA runtimes in one line
    where no NVIDIA GPU is present at all, rather than one refusal for each."""
    without_gpu: list[str] = []
    for runtime in RUNTIMES:
        backend, device = runtime.backend, runtime.device
        if backends is not None and backend not in backends:
            continue
        for precision in precisions:
            if is_reference(backend, device, precision) or not runs(backend, precision, device):
                continue  # the reference is what every other runtime is compared with
            if not wanted(backend, device, precision):
                continue
            if device == "cuda" and not nvidia_gpu_present():
                without_gpu.append(backend)
                continue
            opened: list[Runner | None] = []
            try:
                for graph in graphs_at(precision):
                    if graph is None:
                        opened.append(None)
                        continue
                    role, at = graph
                    chosen = open_runner(
                        export_dir, manifest, role, refusals=False, backend=backend, device=device, precision=at
                    )
                    opened.append(chosen.runner)
            except VqtoolError as exc:
                _close(opened)
                if skipped is not None:
                    skipped.append(not_started(backend, device, precision, str(exc)))
                continue
            try:
                yield Started(backend, device, precision, tuple(opened))
            finally:
                _close(opened)
    if without_gpu and skipped is not None:
        skipped.append(f"{', '.join(dict.fromkeys(without_gpu))} on cuda: no NVIDIA GPU here")


def not_started(backend: str, device: str, precision: str, why: str) -> str:
    """The line saying a runtime did not start at `precision` here: its refusal's first sentence."""
    return f"{backend} on {device} ({precision}): {why.split('; ')[0]}"


def _close(runners: list[Runner | None]) -> None:
    for runner in runners:
        if runner is not None:
            runner.close()

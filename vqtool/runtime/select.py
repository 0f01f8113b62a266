"""Choosing and starting a runtime for an export: `open_runner`, and the `auto` policy.

`auto` tries the GPU runtimes first (RUNTIMES' auto_rank) and keeps the first that actually starts, remembering
why the others did not, so every command can say what really ran. On the CPU it chooses by measurement: the
fastest runtime in the export's bench.json among those whose codes parity.json shows exact (FP32).
`precision="fastest"` widens that to every precision parity.json publishes under a contract, exact or bounded.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from vqtool.errors import VqtoolError
from vqtool.formats.manifest import LATENT_ROLES, PARITY_NAME, Manifest, graph_key, verify_graph
from vqtool.formats.records import (
    parity_report,
    read_bench_rows,
    read_latent_reports,
    read_parity_reports,
    runtime_record,
)
from vqtool.host import inference_threads, nvidia_gpu_present
from vqtool.precisions import BF16, BOUNDED_CONTRACT, EXACT_CONTRACT, FASTEST, FP32, INT8, NO_CONTRACT, PRECISIONS
from vqtool.precisions import row as precision_row
from vqtool.runtime.base import (
    BACKENDS,
    DEVICES,
    ENGINE_BACKENDS,
    LABELS,
    REFERENCE,
    RUNTIMES,
    Backend,
    Device,
    GraphToOpen,
    Runner,
    backends_running,
    refusal,
    runs,
    runtime_for,
)


@dataclass(frozen=True)
class ChosenRunner:
    """A started runner and, for auto, why it was chosen and why faster backends were passed over."""

    runner: Runner
    skipped: tuple[str, ...]
    chosen: str = ""

    def describe(self) -> str:
        note = f" ({self.chosen})" if self.chosen else ""
        note += f" (passed over: {'; '.join(self.skipped)})" if self.skipped else ""
        return f"{self.runner.backend}: {self.runner.describe()}{note}"


def bf16_note(export_dir: Path, backend: str = Backend.auto.value) -> str:
    """What parity.json says of BF16's codes on `backend` (auto: the one auto starts, OpenVINO), for describe():
    never checked, or the contract they met. Refusing is each graph's, when it starts (`open_runner`): BF16's codes
    may meet no contract while its latent graphs meet their own rule."""
    if backend == Backend.auto.value:
        backend = Backend.openvino.value  # auto starts no PyTorch runner: it is the reference, chosen by name only
    report = parity_report(export_dir, backend, BF16)
    if report is None:
        return f"bf16 not yet checked on this export: vqtool parity EXPORT_DIR --backend {backend} --precision bf16"
    if report.met == NO_CONTRACT:
        share = f"{report.identical_fraction:.2%} identical codes"
        return f"bf16 codes met no contract ({share}), so its codes graphs are refused"
    return f"bf16 {report.met} contract: {report.identical_fraction:.2%} identical codes"


def fastest_choice(export_dir: Path, manifest: Manifest, choice: RuntimeChoice) -> tuple[RuntimeChoice, str]:
    """precision="fastest" made concrete: among the runtimes and precisions parity.json publishes under a contract
    (exact or bounded) whose encoder graph this export has and that `choice`'s backend and device allow, the one
    bench.json measured fastest to encode at its largest batch; with the reason. Where bench.json measures none
    of them, fp32 (exact) on `choice`'s backend, and the reason says how to measure them."""
    published = []
    for report in read_parity_reports(export_dir):
        if report.met not in (EXACT_CONTRACT, BOUNDED_CONTRACT) or report.precision not in PRECISIONS:
            continue
        if graph_key("encoder", report.precision) not in manifest.graphs:
            continue
        if choice.backend not in (Backend.auto.value, report.runtime):
            continue
        if choice.device != Device.auto.value and not runs(report.runtime, report.precision, choice.device):
            continue
        published.append(report)
    rows = [r for r in read_bench_rows(export_dir) if r.stage == "encode"]
    largest = max((r.batch for r in rows), default=0)
    speeds = {(r.backend, r.precision): r.images_per_s for r in rows if r.batch == largest}
    measured = [r for r in published if (r.runtime, r.precision) in speeds]
    if not measured:
        why = "fp32, as bench.json has measured none of the runtimes parity published (vqtool bench EXPORT_DIR does)"
        return replace(choice, precision=FP32), f"fastest: {why}"
    best = max(measured, key=lambda r: speeds[(r.runtime, r.precision)])
    speed = speeds[(best.runtime, best.precision)]
    why = (
        f"fastest: {best.runtime} {best.precision}, {speed:,.0f} images/s at batch {largest} in bench.json, "
        f"the fastest of {len(measured)} published under a contract"
    )
    return replace(choice, backend=best.runtime, precision=best.precision), why


def cpu_choice(export_dir: Path, role: str, precision: str) -> tuple[list[str], str]:
    """The CPU runtimes auto tries, best first, and the reason, from what this export has measured.

    Exact first: a runtime is a candidate at fp32 only if parity.json shows every one of its codes identical to
    PyTorch's (ONNX Runtime always is: export checks it), and at other precisions only if it passed their rule.
    Among those, bench.json (written by `vqtool bench` on this machine) decides by speed at its largest batch.
    """
    running = backends_running(precision, Device.cpu.value)
    candidates = [b for b in running if b != REFERENCE]
    if len(candidates) == 1:
        # PyTorch, the reference, starts only when named (--backend torch), at any precision.
        also = f"; PyTorch runs it too when named (--backend {REFERENCE})" if REFERENCE in running else ""
        return candidates, f"{precision} on the CPU: {LABELS[candidates[0]]}, the one runtime auto starts for it{also}"
    default = Backend.onnxruntime.value  # export's own parity always covers it
    exact = {default}
    for backend in candidates:
        report = parity_report(export_dir, backend, precision)
        if report is not None and report.passed and (precision != FP32 or report.exact):
            exact.add(backend)
    stage = "encode" if role == "encoder" else "decode"
    rows = [r for r in read_bench_rows(export_dir) if r.stage == stage and r.precision == precision]
    largest = max((r.batch for r in rows), default=0)
    speeds = {r.backend: r.images_per_s for r in rows if r.batch == largest}
    measured = [name for name in candidates if name in speeds]
    if exact != set(candidates) or len(measured) < len(candidates):
        unproven = [LABELS.get(b, b) for b in candidates if b not in exact]
        shown = f"exact fp32 codes from {' or '.join(unproven)}"
        if precision != FP32:
            shown = f"{precision} codes from {' or '.join(unproven)} under a contract"
        untimed = " against ".join(LABELS.get(b, b) for b in candidates)
        why = (
            f"parity.json shows no {shown}"
            if unproven
            else f"bench.json has not timed {untimed} at {precision} here (vqtool bench EXPORT_DIR does)"
        )
        ordered = [default, *(b for b in candidates if b != default)]
        return ordered, f"on the CPU: ONNX Runtime by default, {why}"
    order = sorted(candidates, key=lambda name: -speeds[name])
    figures = " against ".join(f"{name} {speeds[name]:,.0f}" for name in order)
    exactness = "identical codes" if precision == FP32 else "passed parity"
    return order, f"fastest on the CPU with {exactness}: {figures} images/s at batch {largest} in bench.json"


@dataclass(frozen=True)
class RuntimeChoice:
    """Which runtime runs an export's graphs, as the command line's options and the API's keywords say: the backend
    (auto: the fastest that starts here), the device, the precision, the CPU threads (None: one per core), and
    whether TensorRT engine files in the export may run (an engine is code, not data)."""

    backend: str = Backend.auto.value
    device: str = Device.auto.value
    precision: str = FP32
    threads: int | None = None
    engines: bool = True

    def __post_init__(self) -> None:
        for name in ("backend", "device", "precision"):  # the command line's choices arrive as enum members
            value = getattr(self, name)
            object.__setattr__(self, name, str(getattr(value, "value", value)))
        _check_names(self.backend, self.device, self.precision)
        inference_threads(self.threads)  # at least 1, where given


def _open(
    export_dir: Path, manifest: Manifest, role: str, choice: RuntimeChoice, spin: bool, refusals: bool = True
) -> Runner:
    """Start the choice's backend (named, not auto) on its device (auto: the backend's own) through its loader;
    refused in one sentence where it cannot. A runtime that runs the graph file gets it checked first."""
    backend, device, precision = choice.backend, choice.device, choice.precision
    reason = refusal(role, backend, device, precision)
    if reason is not None:
        raise VqtoolError(reason)
    runtime = runtime_for(backend, device)
    key = graph_key(role, precision)
    path = None
    if runtime.reads_graph:
        if key not in manifest.graphs and precision != FP32:
            raise VqtoolError(f"export has no {precision} {role} graph (export again with --{precision})", export_dir)
        path = verify_graph(export_dir, manifest, key)
    entry = manifest.graphs.get(key)
    activation_bytes = entry.activation_bytes if entry is not None else 0
    graph = GraphToOpen(path, role, precision, device, choice.threads, spin, activation_bytes, export_dir, manifest)
    runner = runtime.open(graph)
    reason = None
    if refusals:
        if role in LATENT_ROLES:
            reason = _latents_refused(export_dir, role, backend, precision, runner.provider)
        else:
            reason = _refused_by_parity(export_dir, backend, precision, runner.provider)
    if reason is not None:
        runner.close()
        raise VqtoolError(reason, export_dir / PARITY_NAME)
    return runner


def _refused_by_parity(export_dir: Path, backend: str, precision: str, provider: str = "") -> str | None:
    """Why parity.json forbids this runtime, or None: export publishes a reduced precision that met no contract
    beside the rest, recorded as refused, and `vqtool parity` may later find a runtime that meets none. The record
    of this runtime where it ran (its provider, where given) decides; where it was never checked, a record of the
    same graph refused on another runtime refuses it too, until `vqtool parity` checks it here."""
    reports = read_parity_reports(export_dir)
    own = runtime_record(reports, backend, precision, provider)
    int8_published = any(r.runtime == Backend.onnxruntime.value and r.precision == INT8 and r.passed for r in reports)
    instead = "" if precision == FP32 else f"; use {'fp32 or int8' if int8_published and precision != INT8 else 'fp32'}"
    if own is not None:
        if own.met != NO_CONTRACT:
            return None
        return f"{backend} {precision} met no contract on this export ({own.first_failure or 'refused'}){instead}"
    if precision == FP32:
        return None
    for report in reports:
        if report.precision == precision and report.met == NO_CONTRACT:
            return (
                f"{precision} met no contract on this export on {report.runtime} ({report.provider}), and "
                f"{backend} was never checked: vqtool parity EXPORT_DIR --backend {backend}{instead}"
            )
    return None


def _latents_refused(export_dir: Path, role: str, backend: str, precision: str, provider: str = "") -> str | None:
    """Why parity.json forbids this latent graph on this runtime (it missed its rule), or None. As for the codes, a
    runtime never checked (its provider, where given, differs) is refused a precision that missed on another."""
    reports = read_latent_reports(export_dir)
    own = runtime_record(reports, backend, precision, provider)
    if own is not None:
        failures = own.failures_of(role)
        return f"{backend} {precision} {role} missed its rule on this export ({failures[-1]})" if failures else None
    if precision == FP32:
        return None
    for report in reports:
        if report.precision == precision and report.failures_of(role):
            return (
                f"{precision} {role} missed its rule on this export on {report.runtime} ({report.provider}), and "
                f"{backend} was never checked: vqtool parity EXPORT_DIR --backend {backend}"
            )
    return None


def open_backend(backend: str, graph: GraphToOpen) -> Runner:
    """Start `backend` on a graph export or parity wrote aside (an INT8 graph being searched, parity's naive
    variants), through the runtime table's loader; refused where the precision table says it does not run there."""
    if (backend, graph.device) not in precision_row(graph.precision).runtimes:
        raise VqtoolError(f"{backend} on {graph.device} does not run {graph.precision}")
    return runtime_for(backend, graph.device).open(graph)


def _check_names(backend: str, device: str, precision: str) -> None:
    for kind, value, choices in (("backend", backend, BACKENDS), ("precision", precision, (*PRECISIONS, FASTEST))):
        if value not in choices:
            raise VqtoolError(f"unknown {kind} {value!r}; choose one of {', '.join(choices)}")
    if device not in DEVICES:
        raise VqtoolError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")


def open_runner(
    export_dir: Path,
    manifest: Manifest,
    role: str,
    choice: RuntimeChoice | None = None,
    *,
    spin: bool = False,
    refusals: bool = True,
    **keywords: Any,
) -> ChosenRunner:
    """Start the chosen backend (a RuntimeChoice, or its fields as keywords), or with auto the fastest one that
    starts here.

    `spin` keeps ONNX Runtime's idle threads spinning for small batches: faster alone, slower beside readers and
    writers. Without `engines`, no backend that deserializes TensorRT engine files from the export folder is
    started: an engine is code. Without `refusals`, a runtime parity.json records under no contract starts too:
    for parity itself, which measures it afresh.
    """
    choice = choice or RuntimeChoice(**keywords)
    backend, device, precision = choice.backend, choice.device, choice.precision
    manifest.require(export_dir, role)
    reason = refusal(role, backend, device, precision)
    if reason is not None:
        raise VqtoolError(reason)
    devices = {r.device for r in RUNTIMES if precision in r.precisions}
    if device == Device.auto.value and len(devices) == 1:
        device = devices.pop()  # INT8 graphs are built for the CPU: no GPU provider is tried for them
    if not choice.engines and backend in ENGINE_BACKENDS:
        raise VqtoolError(f"--backend {backend} runs TensorRT engine files, which engines=False (--no-engines) ignores")
    if backend != Backend.auto.value:
        return ChosenRunner(_open(export_dir, manifest, role, replace(choice, device=device), spin, refusals), ())
    skipped: list[str] = []
    cpu_order, why = cpu_choice(export_dir, role, precision)
    gpus = sorted(
        (r for r in RUNTIMES if r.device == Device.cuda.value and r.auto_rank and precision in r.precisions),
        key=lambda r: r.auto_rank or 0,
    )
    tries = [*((r.backend, r.device) for r in gpus), *((name, Device.cpu.value) for name in cpu_order)]
    for name, where in tries:
        if device != Device.auto.value and where != device:
            continue
        if not choice.engines and name in ENGINE_BACKENDS:
            skipped.append(f"{name} on {where}: engine files ignored (engines=False)")
            continue
        if where == Device.cuda.value and device == Device.auto.value and not nvidia_gpu_present():
            skipped.append(f"{name} on {where}: no NVIDIA GPU here")
            continue
        try:
            runner = _open(export_dir, manifest, role, replace(choice, backend=name, device=where), spin, refusals)
        except VqtoolError as exc:
            skipped.append(f"{name} on {where}: {str(exc).split('; ')[0]}")
            continue
        return ChosenRunner(runner, tuple(skipped), why if where == Device.cpu.value else "")
    raise VqtoolError(f"no backend could start: {'; '.join(skipped)}")

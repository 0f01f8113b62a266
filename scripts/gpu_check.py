"""Everything that needs a CUDA GPU, in one run, written to one report (see scripts/gpu-check.sh).

Runs from the working tree on a machine with PyTorch and a GPU but possibly nothing else of ours:
no network, no install, ONNX Runtime's CPU build at most, no TensorRT. Each step is bounded in
time and reports what it measured or why it could not run; the report is written even when a
step fails, and the exit status says whether any did.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN_STEPS = 400
# The whole check stays under 8 minutes: these are the steps' own limits.
LIMITS = {"tests": 200, "train": 120, "export": 90, "bench": 120, "imported": 150}
# The CI toys of each imported family (tests/test_import.py): label, library, builder, whether it decodes.
IMPORTED = (
    ("diffusers VQModel", "diffusers", "make_vqmodel", True),
    ("transformers JanusVQVAE", "transformers", "make_janus", True),
    ("transformers Emu3VQVAE", "transformers", "make_emu3", True),
    ("transformers ChameleonVQVAE", "transformers", "make_chameleon", False),
)


class Report:
    """Markdown sections, written out after every step so a killed run still leaves what it measured."""

    def __init__(self, path: Path) -> None:
        self.path, self.parts, self.failed = path, [], False
        self.started = time.monotonic()

    def section(self, title: str, body: str, ok: bool = True) -> None:
        self.failed |= not ok
        self.parts.append(f"## {title}{'' if ok else ' — FAILED'}\n\n{body.rstrip()}\n")
        elapsed = time.monotonic() - self.started
        header = f"# vqtool GPU check\n\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {elapsed:.0f} s so far\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("\n".join([header, *self.parts]))


def _run(command: list[str], limit: float, cwd: Path | None = None) -> tuple[bool, str, float]:
    """A subprocess with the working tree on PYTHONPATH: (succeeded, output, seconds)."""
    # The checkout is laid out as an install lays it (vqtool/train and vqtool/export link to the top-level folders).
    path = f"{os.environ.get('PYTHONPATH', '')}{os.pathsep}{REPO}"
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    try:
        done = subprocess.run(command, cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired as stopped:
        output = (stopped.stdout or b"").decode() if isinstance(stopped.stdout, bytes) else stopped.stdout or ""
        return False, f"{output}\n(stopped after {limit:.0f} s)", time.monotonic() - started
    return done.returncode == 0, done.stdout + done.stderr, time.monotonic() - started


def _fenced(text: str, last: int = 60) -> str:
    lines = text.strip().splitlines()
    return "```\n" + "\n".join(lines[-last:]) + "\n```"


def environment() -> str:
    import torch

    lines = [
        f"- Python {platform.python_version()}, PyTorch {torch.__version__} (CUDA {torch.version.cuda})",
        f"- GPU: {torch.cuda.get_device_name(0)}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB",
    ]
    try:
        import onnxruntime as ort

        lines.append(f"- ONNX Runtime {ort.__version__}, providers listed: {', '.join(ort.get_available_providers())}")
    except ModuleNotFoundError:
        lines.append("- ONNX Runtime: not installed")
    try:
        from vqtool.runtime.tensorrt import import_tensorrt

        lines.append(f"- TensorRT {import_tensorrt().__version__}")
    except Exception as exc:  # noqa: BLE001 - the reason is what the report wants
        lines.append(f"- TensorRT: {exc}")
    smi = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        check=False,
    )
    lines.append(f"- nvidia-smi: {smi.stdout.strip() or smi.stderr.strip()}")
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    lines.append(f"- CPU: {model}, {os.cpu_count()} cores")
    return "\n".join(lines)


def cuda_vs_onnxruntime_cpu(export_dir: Path, device: str = "cuda") -> tuple[bool, str]:
    """Codes from PyTorch on CUDA (TF32 off) against ONNX Runtime on the CPU, on the held-out images."""
    import numpy as np

    from vqtool.export.parity import TOLERANCES, classify_mismatches, torch_reference
    from vqtool.formats.manifest import read_manifest
    from vqtool.model.checkpoint import load_checkpoint
    from vqtool.runtime.pytorch import TorchRunner
    from vqtool.runtime.select import open_runner
    from vqtool.train.data.run_data import held_out_images

    manifest = read_manifest(export_dir)
    checkpoint = load_checkpoint(export_dir / "model.pt")
    images = held_out_images(checkpoint, log=lambda _: None)
    cuda = TorchRunner(export_dir, manifest, "encoder", device)
    onnx_cpu = open_runner(export_dir, manifest, "encoder", backend="onnxruntime", device="cpu").runner
    cuda_codes, cpu_codes = cuda(images), onnx_cpu(images)
    reference = torch_reference(checkpoint.model, images)  # PyTorch on the CPU: distances to judge ties by
    codebook = checkpoint.model.quantizer.search_codebook().detach()
    rtol = TOLERANCES["fp32"].tie_rtol
    lines, ok = [], True
    for name, codes in ((f"PyTorch {device}", cuda_codes), ("ONNX Runtime CPU", cpu_codes)):
        ties, unexplained, gap = classify_mismatches(reference, codebook, codes, rtol)
        same = float((codes == reference.codes).mean())
        lines.append(f"| {name} vs PyTorch CPU | {same:.4%} | {ties} | {unexplained} |")
        ok &= unexplained == 0
    between = float((cuda_codes == cpu_codes).mean())
    decoder = TorchRunner(export_dir, manifest, "decoder", device)
    recon = decoder(reference.codes.astype(np.int32))
    worst = int(np.abs(recon.astype(int) - reference.reconstructions.astype(int)).max())
    ok &= worst <= TOLERANCES["fp32"].max_abs_diff
    table = "\n".join(["| codes | identical | near-ties | unexplained |", "| --- | --- | --- | --- |", *lines])
    body = (
        f"{len(images)} held-out images, {cuda_codes.size} codes. PyTorch {device} vs ONNX Runtime CPU: "
        f"{between:.4%} identical. {device} decoder vs CPU decoder on PyTorch's codes: max |Δ| {worst} grey levels."
        f"\n\n{table}"
    )
    return ok, body


def imported_families(device: str, work: Path) -> tuple[bool, str]:
    """Each imported family's CI toy through the CLI: import, export, then encode and decode 16 embedded
    photographs with PyTorch on `device` and with ONNX Runtime on the CPU, and compare."""
    import numpy as np
    from PIL import Image

    from tests import test_import as toys
    from vqtool.images.embedded import embedded_photographs

    photos = work / "imported-photos"
    photos.mkdir(exist_ok=True)
    for index, image in enumerate(embedded_photographs(toys.SIZE)[:16]):
        Image.fromarray(image).save(photos / f"p{index:02d}.png")
    vqtool = [sys.executable, "-m", "vqtool"]
    rows, ok = [], True
    for label, library, builder, decodes in IMPORTED:
        try:
            __import__(library)
        except ModuleNotFoundError:
            rows.append(f"| {label} | not run: {library} is not installed (pip install 'vqtool[import]') | | |")
            continue
        folder = work / builder
        getattr(toys, builder)(folder)
        checkpoint, export = work / f"{builder}.pt", work / f"{builder}-export"
        runs = {"torch": device, "onnxruntime": "cpu"}
        steps = [
            [*vqtool, "import", str(folder), "--out", str(checkpoint), "--image-size", str(toys.SIZE)],
            [*vqtool, "export", str(checkpoint), "--out", str(export)],
        ]
        steps += [
            [*vqtool, "encode", str(photos), "--model", str(export), "--out", str(work / f"{builder}-{backend}.npy")]
            + ["--backend", backend, "--device", where]
            for backend, where in runs.items()
        ]
        if decodes:  # both decode ONNX Runtime's codes, so that the decoders are compared on the same codes
            steps += [
                [*vqtool, "decode", str(work / f"{builder}-onnxruntime.npy"), "--model", str(export)]
                + ["--out", str(work / f"{builder}-{backend}-recon"), "--backend", backend, "--device", where]
                for backend, where in runs.items()
            ]
        failed = None
        for step in steps:
            good, output, _ = _run(step, LIMITS["imported"])
            if not good:
                failed = output.strip().splitlines()[-1] if output.strip() else "?"
                break
        if failed is not None:
            ok = False
            rows.append(f"| {label} | failed: {failed} | | |")
            continue
        torch_codes, ort_codes = (np.load(work / f"{builder}-{b}.npy") for b in runs)
        same = float((torch_codes == ort_codes).mean())
        worst = "no decoder"
        if decodes:
            recon = [
                np.stack([np.asarray(Image.open(f)) for f in sorted((work / f"{builder}-{b}-recon").glob("*.png"))])
                for b in runs
            ]
            worst = str(int(np.abs(recon[0].astype(int) - recon[1].astype(int)).max()))
        ok &= same >= 0.99 and (not decodes or int(worst) <= 2)  # a report, not a test: near-ties may flip
        rows.append(f"| {label} | {torch_codes.shape} | {same:.4%} | {worst} |")
    header = [f"| family (CI toy) | codes | PyTorch {device} = ONNX Runtime CPU | decode max abs diff |"]
    return ok, "\n".join([*header, "| --- | --- | --- | --- |", *rows])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--report", type=Path, default=REPO / "gpu-check-report.md")
    parser.add_argument(
        "--device", default="cuda", choices=("cuda", "cpu"), help="cpu: rehearse this script without a GPU (no figures)"
    )
    args = parser.parse_args()
    device = args.device
    steps = TRAIN_STEPS if device == "cuda" else 60  # a rehearsal on 2 CPU cores would not finish 400 in time
    report = Report(args.report.resolve())
    try:
        import torch
    except ModuleNotFoundError:
        report.section("environment", "PyTorch is not installed; nothing to check", ok=False)
        return 1
    if device == "cuda" and not torch.cuda.is_available():
        report.section("environment", "PyTorch sees no CUDA GPU here; nothing to check", ok=False)
        return 1
    sys.path.append(str(REPO))
    report.section("environment", environment() if device == "cuda" else "rehearsal on the CPU: no GPU figures")
    python = [sys.executable]
    work = Path(tempfile.mkdtemp(prefix="vqtool-gpu-check-"))

    ok, output, seconds = _run(
        [*python, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider"],
        LIMITS["tests"],
    )
    report.section(f"gpu-marked tests ({seconds:.0f} s)", _fenced(output, 25), ok)

    run = work / "run"
    ok, output, seconds = _run(
        [*python, "-m", "vqtool", "train", "--steps", str(steps), "--device", device, "--out", str(run)],
        LIMITS["train"],
    )
    report.section(f"training on {device}, {steps} steps ({seconds:.0f} s)", _fenced(output, 8), ok)
    if not ok:
        return 1

    export = work / "export"
    ok, output, seconds = _run(
        [*python, "-m", "vqtool", "export", str(run / "checkpoint.pt"), "--out", str(export), "--fp16"],
        LIMITS["export"],
    )
    report.section(f"export and parity on every runtime that starts ({seconds:.0f} s)", _fenced(output, 20), ok)
    if not ok:
        return 1

    try:
        ok, body = cuda_vs_onnxruntime_cpu(export, device)
    except Exception as exc:  # noqa: BLE001 - the report says what broke and the run goes on
        ok, body = False, f"{type(exc).__name__}: {exc}"
    report.section(f"parity: PyTorch on {device} against ONNX Runtime on the CPU", body, ok)

    try:
        ok, body = imported_families(device, work)
    except Exception as exc:  # noqa: BLE001 - the report says what broke and the run goes on
        ok, body = False, f"{type(exc).__name__}: {exc}"
    report.section(f"imported tokenizers: PyTorch on {device} against ONNX Runtime on the CPU", body, ok)

    bench_json = work / "bench.json"
    ok, output, seconds = _run(
        [*python, "-m", "vqtool", "bench", str(export), "--out", str(bench_json)], LIMITS["bench"]
    )
    rows = json.loads(bench_json.read_text())["model_only"] if bench_json.is_file() else []
    table = "\n".join(
        [
            "| stage | backend | provider | precision | batch | images/s | p50 ms | × eager CPU |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        + [
            f"| {r['stage']} | {r['backend']} | {r['provider']} | {r['precision']} | {r['batch']} | "
            f"{r['images_per_s']:,.0f} | {r['p50_ms']:.2f} | {r['vs_baseline'] or 0:.2f} |"
            for r in rows
        ]
    )
    title = f"vqtool bench, every backend that starts ({seconds:.0f} s)"
    report.section(title, f"{table}\n\n{_fenced(output, 12)}", ok)
    print(f"report: {report.path}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())

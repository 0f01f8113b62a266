"""Which convolutions cost an INT8 encoder its agreement with PyTorch, and what keeping them FP32 costs in speed.

    python -m benchmarks.int8_layers CHECKPOINT [--leading 3] [--rounds 3]

Quantizes the checkpoint's encoder as `vqtool export --int8` does (same calibration images and settings):
every convolution in INT8; each convolution alone in INT8; and the first 1..N convolutions kept in FP32.
For each it prints what parity's INT8 rule looks at on the validation images (identical codes, near-ties,
the quality drop of the reconstructions decoded from its codes by PyTorch) and the speed of one
single-threaded ONNX Runtime session at batch 256 (one lane of `vqtool encode`) against the FP32 graph,
timed in alternating rounds.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from vqtool.export.parity import Reference
    from vqtool.model.checkpoint import Checkpoint
    from vqtool.model.vqvae import VQVAE
    from vqtool.train.data.memory import TrainingData

BATCH = 256
REPEATS = 10


class Quantizable(NamedTuple):
    """What measuring a checkpoint's INT8 encoder starts from (this benchmark and benchmarks/int8_errors.py)."""

    checkpoint: Checkpoint
    model: VQVAE  # in eval mode
    data: TrainingData  # what the checkpoint was trained on
    reference: Reference  # PyTorch's codes and reconstructions of data.val
    calibration: np.ndarray  # the crops `vqtool export --int8` calibrates on


def quantizable(path: Path) -> Quantizable:
    from vqtool.export.parity import torch_reference
    from vqtool.export.quantize import CALIBRATION_IMAGES, calibration_images
    from vqtool.model.checkpoint import load_checkpoint
    from vqtool.train.data.run_data import training_set_of

    checkpoint = load_checkpoint(path)
    model = checkpoint.model.eval()
    data = training_set_of(checkpoint, print)
    calibration = calibration_images(data, CALIBRATION_IMAGES, str(checkpoint.data or "the embedded data"), print)
    return Quantizable(checkpoint, model, data, torch_reference(model, data.val), calibration)


def _images_per_s(session, name: str, batch: np.ndarray) -> float:  # noqa: ANN001
    started = time.perf_counter()
    for _ in range(REPEATS):
        session.run(None, {name: batch})
    return REPEATS * len(batch) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--leading", type=int, default=3, help="keep up to this many first convolutions FP32")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import onnxruntime as ort
    import torch

    from vqtool.export.graphs import write_graphs
    from vqtool.export.parity import ParityReport, check_parity
    from vqtool.export.quantize import convolutions_of, write_int8_encoder
    from vqtool.model.vqvae import output_to_images

    checkpoint, model, data, reference, calibration = quantizable(args.checkpoint)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1

    def decode(codes: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return output_to_images(model.decode(torch.from_numpy(codes.astype(np.int64)))).numpy()

    with tempfile.TemporaryDirectory(prefix="vqtool-int8-layers-") as scratch:
        work = Path(scratch)
        fp32 = write_graphs(model, "benchmark", work, "fp32")["encoder"]
        convolutions = convolutions_of(work / fp32.file)
        variants: dict[str, list[str]] = {"all INT8": []}
        for index, name in enumerate(convolutions):
            variants[f"only conv {index} INT8"] = [other for other in convolutions if other != name]
        variants |= {f"convs 0-{n - 1} FP32": convolutions[:n] for n in range(1, args.leading + 1)}
        sessions = {"FP32": ort.InferenceSession(str(work / fp32.file), options, providers=["CPUExecutionProvider"])}
        rows: dict[str, ParityReport] = {}
        for label, kept in variants.items():
            folder = work / f"v{len(rows)}"
            folder.mkdir()
            shutil.copy(work / fp32.file, folder / fp32.file)
            entry = write_int8_encoder(folder, fp32, calibration, keep_fp32=kept)
            session = ort.InferenceSession(str(folder / entry.file), options, providers=["CPUExecutionProvider"])
            sessions[label] = session
            report = check_parity(
                model,
                data.val,
                lambda images, s=session: s.run(None, {fp32.input: images})[0],
                decode,
                runtime="onnxruntime",
                provider=session.get_providers()[0],
                precision="int8",
                reference=reference,
            )
            rows[label] = report
        batch = calibration[:BATCH]
        speeds: dict[str, list[float]] = {label: [] for label in sessions}
        for _ in range(args.rounds):  # alternating rounds: the machine drifts
            for label, session in sessions.items():
                speeds[label].append(_images_per_s(session, fp32.input, batch))
        best = {label: max(values) for label, values in speeds.items()}

    print(f"\n{len(data.val)} validation images, {checkpoint.model_config.codes} codes; provider CPUExecutionProvider")
    print("| encoder | identical codes | near-ties | other | quality drop | images/s (1 thread) | × FP32 |")
    print("|---|---|---|---|---|---|---|")
    print(f"| FP32 | | | | | {best['FP32']:,.0f} | 1.00× |")
    for label, report in rows.items():
        print(
            f"| {label} | {report.identical / report.codes:.1%} | {report.near_ties} | {report.unexplained} | "
            f"{report.quality_drop_db:+.2f} dB | {best[label]:,.0f} | {best[label] / best['FP32']:.2f}× |"
        )


if __name__ == "__main__":
    main()

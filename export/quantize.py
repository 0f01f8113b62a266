"""An INT8 encoder for CPUs with 8-bit dot-product instructions (AVX-512 VNNI, AVX-VNNI, ARM dot-product).

Static quantization with ONNX Runtime's tool: the convolutions get per-channel INT8 weights and UINT8
activations whose ranges are calibrated on real images; the distance, the ArgMin and the codebook stay
FP32, as in the FP16 graph. A ReLU after a convolution is folded into it: the convolution's output is
quantized over the ReLU's range [0, max] rather than over its own, so its 256 levels are not spent on the
negative values the ReLU throws away. The result is QDQ ONNX, which ONNX Runtime's CPU provider fuses into
integer convolutions. It trades exact codes for speed, so parity holds it to its own tolerance; where
every convolution in INT8 would miss it by much, the first convolutions stay FP32
(write_checked_int8_encoder).
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from vqtool.formats.manifest import GraphEntry, graph_key, sha256_file
from vqtool.model.checkpoint import TokenizerModel
from vqtool.runtime.base import INT8
from vqtool.train.data.memory import TrainingData

CALIBRATION_IMAGES = 2048
CALIBRATION_BATCH = 256
CALIBRATION_SEED = 7
# Percentile calibration ignores the rarest 0.001% of activations at each end, which keeps more codes identical
# than plain min/max ranges (docs/design-measurements.md, "INT8").
PERCENTILE = 99.999
# Parity's INT8 rule asks 90% identical codes on the validation images; the export aims higher on its own
# held-out training crops, so that the rule still holds on images unlike them.
AGREEMENT_TARGET = 0.92
AGREEMENT_IMAGES = 1024
AGREEMENT_SEED = 8  # other crops than the calibration's (CALIBRATION_SEED)
FP32_CONVOLUTIONS_KEY = "vqtool.int8_fp32_convolutions"


@contextlib.contextmanager
def _quiet_logging() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def calibration_images(data: TrainingData, count: int, source: str, log: Callable[[str], None]) -> np.ndarray:
    """`count` training crops of `data`, which was read from `source`."""
    images = data.batch(0, count, seed=CALIBRATION_SEED)
    log(f"calibrating INT8 ranges on {len(images)} images from {source}")
    return images


def write_int8_encoder(
    folder: Path,
    fp32: GraphEntry,
    images: np.ndarray,
    *,
    keep_fp32: Sequence[str] = (),
) -> GraphEntry:
    """Quantize the FP32 encoder in `folder` to encoder.int8.onnx, calibrated on `images` (N x H x W x 3 uint8).

    `keep_fp32` names convolutions (ONNX node names) left in FP32 (benchmarks/int8_layers.py measures them)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):  # type: ignore[misc]  # untyped base from onnxruntime
        def __init__(self) -> None:
            starts = range(0, len(images), CALIBRATION_BATCH)
            self.batches: Iterator[np.ndarray] = (images[s : s + CALIBRATION_BATCH] for s in starts)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {fp32.input: batch}

    out_path = folder / f"{graph_key('encoder', INT8)}.onnx"
    with tempfile.TemporaryDirectory(prefix="vqtool-int8-") as scratch:
        # Shape inference first, as the tool asks: it quantizes only tensors whose shapes it knows.
        prepared = Path(scratch) / "prepared.onnx"
        # The tool narrates calibration on stdout and warns through logging; stdout is for results.
        with contextlib.redirect_stdout(io.StringIO()), _quiet_logging():
            quant_pre_process(str(folder / fp32.file), str(prepared))
            quantize_static(
                str(prepared),
                str(out_path),
                Batches(),
                quant_format=QuantFormat.QDQ,
                # Relu: the tool removes a ReLU that follows a quantized convolution and calibrates the
                # convolution's output on the ReLU's output (QDQRemovableActivation); the integer convolution
                # clamps at the zero point, which is the ReLU. Calibrated before the ReLU instead, most of an
                # output's 256 levels would hold values the ReLU zeroes (docs/experiments.md has the figures).
                # MatMul is the distance: it stays FP32.
                op_types_to_quantize=["Conv", "Relu"],
                nodes_to_exclude=list(keep_fp32),
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.Percentile,
                extra_options={"CalibPercentile": PERCENTILE},
            )
    graph = onnx.load(str(out_path))
    for prop in graph.metadata_props:
        if prop.key == "vqtool.precision":
            prop.value = INT8
    graph.metadata_props.add(key=FP32_CONVOLUTIONS_KEY, value=str(len(keep_fp32)))
    onnx.save(graph, str(out_path))
    return GraphEntry(out_path.name, sha256_file(out_path), INT8, fp32.input, fp32.output, fp32.activation_bytes)


def code_agreement(model: TokenizerModel, images: np.ndarray) -> Callable[[Path], float]:
    """A measure of an encoder graph: the share of its codes for `images` that are PyTorch's."""
    from vqtool.export.parity import BATCH, torch_reference
    from vqtool.runtime.onnxruntime import OnnxRuntimeRunner

    reference = torch_reference(model, images).codes

    def agreement(graph: Path) -> float:
        encoder = OnnxRuntimeRunner(graph, "cpu")
        codes = np.concatenate([encoder(images[s : s + BATCH]) for s in range(0, len(images), BATCH)])
        return float((codes == reference).mean())

    return agreement


def convolutions_of(graph_path: Path) -> list[str]:
    """The graph's Conv node names in graph order, which is the encoder's order from the image on."""
    import onnx

    return [node.name for node in onnx.load(str(graph_path)).graph.node if node.op_type == "Conv"]


def write_checked_int8_encoder(
    folder: Path,
    fp32: GraphEntry,
    images: np.ndarray,
    agreement: Callable[[Path], float],
    log: Callable[[str], None],
    checked_on: str = "held-out training crops",
) -> GraphEntry:
    """write_int8_encoder, keeping the first convolutions FP32, one more at a time, until `agreement` (the share
    of codes an INT8 graph gives as PyTorch does, on images other than the calibration's) reaches AGREEMENT_TARGET.

    Why the first ones: with codes looked up in a few l2-normalised dimensions, neighbouring codes lie close, and
    the early, full-resolution convolutions move the most codes across their boundaries. The first one most of
    all: its input is the image, whose normalised pixels ((p - 127.5) / 127.5) fall halfway between UINT8 levels,
    and with three input channels it runs no faster in INT8 (benchmarks/int8_layers.py measures each one's cost).
    Keeping a prefix leaves one INT8 section, with no FP32 island between quantized layers. At most half of them
    are kept: beyond that INT8 gains too little, and parity judges what is left.
    """
    convolutions = convolutions_of(folder / fp32.file)
    most = len(convolutions) // 2
    for kept in range(most + 1):
        entry = write_int8_encoder(folder, fp32, images, keep_fp32=convolutions[:kept])
        share = agreement(folder / entry.file)
        if share >= AGREEMENT_TARGET:
            break
    how = "every convolution INT8" if not kept else f"the first {kept} of {len(convolutions)} convolutions FP32"
    log(f"INT8 encoder: {how}, {share:.1%} of codes as PyTorch's on {checked_on}")
    return entry

"""An INT8 encoder for CPUs with 8-bit dot-product instructions (AVX-512 VNNI, AVX-VNNI, ARM dot-product).

Static quantization with ONNX Runtime's tool: the convolutions get per-channel INT8 weights and UINT8
activations whose ranges are calibrated on real images; the distance, the ArgMin and the codebook stay
FP32, as in the FP16 graph. A ReLU after a convolution is folded into it: the convolution's output is
quantized over the ReLU's range [0, max] rather than over its own, so its 256 levels are not spent on the
negative values the ReLU throws away. The result is QDQ ONNX, which ONNX Runtime's CPU provider fuses into
integer convolutions. It trades exact codes for speed, so it has only the bounded contract (near-neighbour codes
that decode to the same picture); where every convolution in INT8 would miss it, the first convolutions stay FP32
(write_checked_int8_encoder).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from vqtool.formats.manifest import GraphEntry, batch_within_budget, graph_key, sha256_file
from vqtool.model.face import TokenizerModel
from vqtool.precisions import BOUNDED, INT8
from vqtool.train.data.memory import TrainingData

CALIBRATION_IMAGES = 2048
CALIBRATION_BATCH = 256
# ONNX Runtime's Percentile calibrator keeps every calibrated tensor of every image it is given in one collect_data
# call until it builds its histograms: a 256 x 256 latent-diffusion encoder holds gigabytes per image. Images
# are given in chunks whose tensors fit this budget; the histograms merge across chunks. The default model's
# 2048 crops at 32 x 32 fit in one chunk, so its INT8 graph is what one call gives.
CALIBRATION_MEMORY = 2 << 30
CALIBRATION_SEED = 7
# Percentile calibration ignores the rarest 0.001% of activations at each end, which keeps more codes identical
# than plain min/max ranges (docs/design-measurements.md, "INT8").
PERCENTILE = 99.999
# The search aims inside the bounded contract (the precision table's) by a margin on its own held-out images, so that
# parity's rule still holds on images unlike them: 80% of the regret allowed, 1 dB above the decode's limit.
SEARCH_RULE = replace(BOUNDED, max_regret_p99=0.8 * BOUNDED.max_regret_p99, min_drift_psnr=BOUNDED.min_drift_psnr + 1.0)
AGREEMENT_IMAGES = 1024
AGREEMENT_SEED = 8  # other crops than the calibration's (CALIBRATION_SEED)
# An imported model's agreement is measured on as many of its calibration images as give this many codes: a
# 256 x 256 image takes seconds to encode in PyTorch and again in each INT8 graph tried.
AGREEMENT_CODES = 16384
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


def calibrated_bytes_per_image(graph_path: Path, height: int, width: int) -> int:
    """Bytes of the tensors ONNX Runtime's calibrator keeps for one image of height x width: every input and output
    of the graph's Conv and Relu nodes, in FP32 (their shapes inferred for a batch of one)."""
    import onnx

    model = onnx.load(str(graph_path))
    del model.graph.value_info[:]  # shapes inferred before, with symbolic sizes
    for dim, value in zip(model.graph.input[0].type.tensor_type.shape.dim, (1, height, width, 3), strict=True):
        dim.dim_value = value  # replaces a symbolic size (batch, sides) with this one
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: v.type.tensor_type.shape for v in (*inferred.graph.value_info, *inferred.graph.input)}
    weights = {t.name for t in inferred.graph.initializer}
    calibrated = {
        name
        for node in inferred.graph.node
        if node.op_type in ("Conv", "Relu")
        for name in (*node.input, *node.output)
        if name and name not in weights
    }
    unknown = [name for name in calibrated if name not in shapes or any(d.dim_value < 1 for d in shapes[name].dim)]
    if unknown:  # not seen in vqtool's graphs; counted as the image itself at 512 channels rather than as nothing
        return len(calibrated) * height * width * 512 * 4
    return sum(int(np.prod([d.dim_value for d in shapes[name].dim])) * 4 for name in calibrated)


def _can_reuse_ranges() -> bool:
    """Whether this ONNX Runtime stores calibrated ranges for the next quantize_static (calibration_cache_path)."""
    from onnxruntime.quantization import quantize_static

    return "calibration_cache_path" in inspect.signature(quantize_static).parameters


def _chunked_reader(prepared: Path, input_name: str, images: np.ndarray) -> Any:
    """A CalibrationDataReader over `images` a chunk at a time (set_range picks one; one collect_data call each),
    each chunk holding as many images as keep the calibrated tensors under CALIBRATION_MEMORY, fed in batches."""
    from onnxruntime.quantization import CalibrationDataReader

    height, width = images.shape[1:3]
    per_image = calibrated_bytes_per_image(prepared, height, width)
    chunk = max(1, min(len(images), CALIBRATION_MEMORY // per_image))
    batch = min(CALIBRATION_BATCH, chunk)

    class Chunks(CalibrationDataReader):  # type: ignore[misc]  # untyped base from onnxruntime
        def __init__(self) -> None:
            self.starts = range(0, len(images), chunk)
            self.set_range(0, 1)

        def __len__(self) -> int:
            return len(self.starts)

        def set_range(self, start_index: int, end_index: int) -> None:
            first, end = self.starts[start_index], min(len(images), self.starts[end_index - 1] + chunk)
            self.batches: Iterator[np.ndarray] = (images[s : min(s + batch, end)] for s in range(first, end, batch))

        def get_next(self) -> dict[str, np.ndarray] | None:
            next_batch = next(self.batches, None)
            return None if next_batch is None else {input_name: next_batch}

    return Chunks()


def write_int8_encoder(
    folder: Path,
    fp32: GraphEntry,
    images: np.ndarray,
    *,
    keep_fp32: Sequence[str] = (),
    work: Path | None = None,
) -> GraphEntry:
    """Quantize the FP32 encoder in `folder` to encoder.int8.onnx, calibrated on `images` (N x H x W x 3 uint8).

    `keep_fp32` names convolutions (ONNX node names) left in FP32 (benchmarks/int8_layers.py measures them).
    `work`: a folder kept between calls on the same graph and images, where the prepared graph and the calibrated
    ranges are made once (ranges are those of the FP32 graph, whichever convolutions stay FP32)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out_path = folder / f"{graph_key('encoder', INT8)}.onnx"
    with contextlib.ExitStack() as stack:
        if work is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vqtool-int8-")))
        # Shape inference first, as the tool asks: it quantizes only tensors whose shapes it knows.
        prepared = work / "prepared.onnx"
        # The tool narrates calibration on stdout and warns through logging; stdout is for results.
        stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        stack.enter_context(_quiet_logging())
        if not prepared.exists():
            quant_pre_process(str(folder / fp32.file), str(prepared))
        ranges = work / "ranges.json"
        reuse = {"calibration_cache_path": str(ranges)} if _can_reuse_ranges() else {}
        # With ranges kept from an earlier call nothing is calibrated: no reader, and no shapes inferred for one.
        reader = None if reuse and ranges.is_file() else _chunked_reader(prepared, fp32.input, images)
        quantize_static(
            str(prepared),
            str(out_path),
            reader,
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
            # Weights in 7 bits: without VNNI, x86 CPUs multiply uint8 by int8 in pairs summed into int16
            # (vpmaddubsw), which saturates for 8-bit weights (2 x 255 x 128 > 32767) and moves codes; 2 x 255 x 64
            # fits, so the integer sums are the same on every x86 CPU (docs/experiments.md has the figures).
            reduce_range=True,
            calibrate_method=CalibrationMethod.Percentile,
            # One collect_data call per chunk: despite its name the option strides any calibrator's data.
            extra_options={"CalibPercentile": PERCENTILE, "CalibStridedMinMax": 1},
            **reuse,
        )
    graph = onnx.load(str(out_path))
    for prop in graph.metadata_props:
        if prop.key == "vqtool.precision":
            prop.value = INT8
    graph.metadata_props.add(key=FP32_CONVOLUTIONS_KEY, value=str(len(keep_fp32)))
    onnx.save(graph, str(out_path))
    return GraphEntry(out_path.name, sha256_file(out_path), INT8, fp32.input, fp32.output, fp32.activation_bytes)


# What the search judges a graph by: what the INT8 encoder's codes are on the images it checks, and why they miss
# the bounded contract (empty: they meet it).
Judgement = tuple[float, list[str]]


def bounded_judge(
    model: TokenizerModel, images: np.ndarray, activation_bytes: int = 0, min_identical: float = 0.0
) -> Callable[[Path], Judgement]:
    """A measure of an encoder graph against PyTorch on `images`: the share of its codes that are PyTorch's, and
    why they miss SEARCH_RULE (the bounded contract with a margin, asking at least `min_identical`).
    `activation_bytes`: the FP32 graph's largest activation per image, which sizes the batches."""
    from vqtool.export.drift import measure_drift, torch_decoder
    from vqtool.export.parity import BATCH, torch_reference
    from vqtool.runtime.base import GraphToOpen
    from vqtool.runtime.select import open_backend

    batch = batch_within_budget(activation_bytes, BATCH)
    reference = torch_reference(model, images, batch=batch, decode=model.has_decoder)
    codebook = model.quantizer.search_codebook().detach().cpu()
    decode = torch_decoder(model, batch) if model.has_decoder else None
    rule = replace(SEARCH_RULE, min_identical=max(min_identical, SEARCH_RULE.min_identical))

    def judge(graph: Path) -> Judgement:
        encoder = open_backend(
            "onnxruntime", GraphToOpen(graph, "encoder", INT8, "cpu", activation_bytes=activation_bytes)
        )
        try:
            codes = np.concatenate([encoder(images[s : s + batch]) for s in range(0, len(images), batch)])
        finally:
            encoder.close()
        drift = measure_drift(reference, codebook, codes, decode, None)
        share = float((codes == reference.codes).mean())
        return share, rule.missed(share, drift.regret_p99, drift.rank_max, drift.drift_psnr)

    return judge


def convolutions_of(graph_path: Path) -> list[str]:
    """The graph's Conv node names in graph order, which is the encoder's order from the image on."""
    import onnx

    return [node.name for node in onnx.load(str(graph_path)).graph.node if node.op_type == "Conv"]


def write_checked_int8_encoder(
    folder: Path,
    fp32: GraphEntry,
    images: np.ndarray,
    judge: Callable[[Path], Judgement],
    log: Callable[[str], None],
    checked_on: str = "held-out training crops",
) -> GraphEntry:
    """write_int8_encoder, keeping the fewest of the first convolutions FP32 with which the graph's codes meet the
    bounded contract, with a margin (`judge`, a bounded_judge).

    Why the first ones: with codes looked up in a few l2-normalised dimensions, neighbouring codes lie close, and
    the early, full-resolution convolutions move the most codes across their boundaries. The first one most of
    all: its input is the image, whose normalised pixels ((p - 127.5) / 127.5) fall halfway between UINT8 levels,
    and with three input channels it runs no faster in INT8 (benchmarks/int8_layers.py measures each one's cost).
    Keeping a prefix leaves one INT8 section, with no FP32 island between quantized layers. At most half of them
    are kept: beyond that INT8 gains too little, and parity judges what is left. Drift shrinks as the prefix grows,
    so the prefix is found by bisection: each graph tried costs a quantization and a run over the images, which
    for a 256 x 256 model takes minutes. The ranges are calibrated once for all of them where ONNX Runtime can
    keep them (quantize_static's calibration_cache_path; older releases calibrate each graph again).
    """
    convolutions = convolutions_of(folder / fp32.file)
    most = len(convolutions) // 2
    judged: dict[int, Judgement] = {}
    last: list[tuple[int, GraphEntry]] = []  # the graph on disk: each one tried overwrites the one before
    with tempfile.TemporaryDirectory(prefix="vqtool-int8-") as work:

        def written(kept: int) -> GraphEntry:
            entry = write_int8_encoder(folder, fp32, images, keep_fp32=convolutions[:kept], work=Path(work))
            last[:] = [(kept, entry)]
            return entry

        def agrees(kept: int) -> bool:
            judged[kept] = judge(folder / written(kept).file)
            return not judged[kept][1]

        # `missed`: a prefix known to fall short (-1: none tried); `kept`: one that reaches the target, or `most`.
        missed, kept = -1, 0
        if not agrees(0):
            missed, kept = 0, most
            if most > 0 and agrees(most):
                while kept - missed > 1:
                    middle = (missed + kept) // 2
                    missed, kept = (missed, middle) if agrees(middle) else (middle, kept)
        entry = last[0][1] if last[0][0] == kept else written(kept)  # quantized again from the calibrated ranges
    share, misses = judged[kept]
    how = "every convolution INT8" if not kept else f"the first {kept} of {len(convolutions)} convolutions FP32"
    verdict = f"outside the bounded contract ({misses[0]})" if misses else "within the bounded contract"
    log(f"INT8 encoder: {how}, {share:.1%} of codes as PyTorch's on {checked_on}, {verdict}")
    return entry

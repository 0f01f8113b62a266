"""Running an exported ONNX graph with OpenVINO on the CPU: FP32, BF16 (with the quantizer kept in FP32) and INT8.

The same `encoder.onnx` / `decoder.onnx` / `encoder.int8.onnx` that ONNX Runtime runs; OpenVINO reads ONNX
directly. BF16 is not a graph of its own but OpenVINO's inference-precision hint over the FP32 graph.

Why the BF16 island is two compiled models: OpenVINO's CPU plugin (2026.4) ignores the per-node marks that
keep FP16 compression away from a node (`disable_fp16_compression` in rt_info) when it enforces BF16, so the
distance MatMul ran in BF16 whatever was marked. Cutting the graph where the quantizer begins and compiling
the two parts with different precision hints is what reliably keeps the codebook, the distances and ArgMin
(and on the decoder, the lookup and back-projection) in FP32.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from vqtool.errors import VqtoolError, first_line, missing_extra
from vqtool.host import cpu_description
from vqtool.precisions import BF16, NAIVE_BF16
from vqtool.runtime.base import GraphToOpen, Runner

HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # INT8 comes from the graph's QDQ nodes, the rest FP32


def import_openvino() -> Any:
    try:
        import openvino
    except ModuleNotFoundError:
        raise missing_extra("--backend openvino", "OpenVINO", "openvino") from None
    return openvino


def bf16_missing() -> str | None:
    """Why OpenVINO cannot run BF16 here (not installed, or a CPU without BF16 arithmetic); None where it can.
    It imports OpenVINO: call it in a process that will not fork afterwards."""
    try:
        ov = import_openvino()
    except VqtoolError as exc:
        return str(exc)
    return _bf16_missing(ov.Core())


def _bf16_missing(core: Any) -> str | None:
    if "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        return None
    return f"this CPU has no BF16 support in OpenVINO ({cpu_description()}); use fp32 or int8"


def _decodes(role: str) -> bool:
    """Whether the graph of `role` is a decoder (decoder, decoder_latents): its quantizer side comes first."""
    return role.split("_")[0] == "decoder"


def _quantizer_cut(model: Any, role: str) -> Any:
    """The tensor where the quantizer begins: on an encoder, the output of its last convolution (bias added);
    on a decoder, the input of its first convolution. Everything on the quantizer's side stays FP32 (for the latent
    graphs, the layout change, and a quantising latent decoder's search and lookup)."""
    convolutions = [op for op in model.get_ordered_ops() if op.get_type_name() in ("Convolution", "GroupConvolution")]
    if not convolutions:
        raise VqtoolError("graph has no convolution to cut the BF16 part at")
    if _decodes(role):
        return convolutions[0].input_value(0)
    last = convolutions[-1].output(0)
    bias = [t.get_node() for t in last.get_target_inputs() if t.get_node().get_type_name() == "Add"]
    return bias[0].output(0) if len(bias) == 1 else last


def split_at_quantizer(ov: Any, core: Any, path: Path, role: str) -> tuple[Any, Any]:
    """(graph input -> cut, (cut, graph input) -> graph output): two models whose composition is the graph.

    The second model also takes the graph's input: shape computations past the cut may still read it (the
    decoder's output shape comes from the codes' shape).
    """
    head_model = core.read_model(str(path))
    head = ov.Model([_quantizer_cut(head_model, role)], head_model.get_parameters(), "head")
    tail_model = core.read_model(str(path))  # a second copy: the cut rewires it
    cut = _quantizer_cut(tail_model, role)
    joint = ov.opset13.parameter(cut.get_partial_shape(), cut.get_element_type(), name="quantizer_input")
    for target in list(cut.get_target_inputs()):
        target.replace_source_output(joint.output(0))
    tail = ov.Model(tail_model.get_results(), [joint, *tail_model.get_parameters()], "tail")
    return head, tail


class OpenVinoRunner:
    """One graph compiled by OpenVINO for the CPU; one infer request per calling thread."""

    backend = "openvino"

    def __init__(
        self, path: Path, role: str, precision: str = "fp32", threads: int | None = None, island: bool = True
    ) -> None:
        ov = import_openvino()
        if precision not in HINTS:
            raise VqtoolError(f"OpenVINO runs fp32, bf16 or int8, not {precision}")
        core = ov.Core()
        missing = _bf16_missing(core) if precision == "bf16" else None
        if missing:
            raise VqtoolError(missing)

        def config(hint: str) -> dict[str, Any]:
            # Without the hint OpenVINO runs FP32 graphs in BF16 on CPUs with AMX: FP32 must say so.
            settings: dict[str, Any] = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
            if threads:
                settings["INFERENCE_NUM_THREADS"] = threads
            return settings

        try:
            if precision == "bf16" and island:
                head, tail = split_at_quantizer(ov, core, path, role)
                hints = ("f32", "bf16") if _decodes(role) else ("bf16", "f32")
                self.stages = [
                    core.compile_model(m, "CPU", config(h)) for m, h in zip((head, tail), hints, strict=True)
                ]
            else:
                self.stages = [core.compile_model(core.read_model(str(path)), "CPU", config(HINTS[precision]))]
        except VqtoolError:
            raise
        except Exception as exc:  # OpenVINO raises its own untyped errors for graphs it cannot read or compile
            raise VqtoolError(f"OpenVINO cannot load this graph ({first_line(exc)})", path) from None
        self.precision, self.island = precision, precision == "bf16" and island
        self.version = str(ov.__version__).split("-")[0]
        self.provider = "CPU"
        self._local = threading.local()

    def _requests(self) -> list[Any]:
        # An infer request runs one inference at a time; each thread gets its own, the compiled models are shared.
        requests: list[Any] | None = getattr(self._local, "requests", None)
        if requests is None:
            requests = [stage.create_infer_request() for stage in self.stages]
            self._local.requests = requests
        return requests

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch)
        requests = self._requests()
        if len(requests) == 1:
            whole: np.ndarray = requests[0].infer({0: batch}, share_inputs=True)[0]
            return whole
        # The head's output is shared with the tail, which reads it at once; the tail's own output is copied.
        joint = requests[0].infer({0: batch}, share_inputs=True, share_outputs=True)[0]
        result: np.ndarray = requests[1].infer({0: joint, 1: batch}, share_inputs=True)[0]
        return result

    def describe(self) -> str:
        note = ", quantizer in FP32" if self.island else (", whole graph" if self.precision == "bf16" else "")
        return f"OpenVINO {self.version} on CPU, {self.precision}{note} [{cpu_description()}]"

    def pipelined(self) -> Runner:
        return self  # its infer requests have no threads of their own that spin

    def close(self) -> None:
        pass

    def runtime_precisions(self) -> list[dict[str, str]]:
        """Each executed layer's type and the precision it really ran in, stage by stage (for tests and reports)."""
        layers = []
        for stage_index, stage in enumerate(self.stages):
            for op in stage.get_runtime_model().get_ordered_ops():
                info = op.get_rt_info()
                layers.append(
                    {
                        "stage": str(stage_index),
                        "type": info["layerType"].astype(str),
                        "precision": info["runtimePrecision"].astype(str),
                        "names": info["originalLayersNames"].astype(str),
                    }
                )
        return layers


def load(graph: GraphToOpen) -> OpenVinoRunner:
    """The runtime table's loader for OpenVINO on the CPU. bf16-naive, parity's comparison, is BF16 over the whole
    graph: the quantizer is not kept FP32."""
    assert graph.path is not None
    naive = graph.precision == NAIVE_BF16
    return OpenVinoRunner(graph.path, graph.role, BF16 if naive else graph.precision, graph.threads, island=not naive)

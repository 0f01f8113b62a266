"""Build TensorRT engines from the exported ONNX graphs (TensorRT 10 Python API).

Networks are always strongly typed: precision comes from the ONNX graph itself (the FP16 graphs
carry their own casts, with the quantizer kept in FP32), because TensorRT 10.12 deprecates the
FP16 builder flag and TensorRT 11 removes it. TF32 is switched off so that an FP32 engine's
distances and ArgMin match PyTorch's FP32 codes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vqtool.atomic import write_bytes, write_json
from vqtool.errors import VqtoolError
from vqtool.manifest import sha256_file
from vqtool.trt_runtime import EngineMetadata, GpuIdentity, metadata_path

if TYPE_CHECKING:
    import tensorrt as trt


@dataclass(frozen=True)
class EngineProfile:
    """The dynamic batch range one engine accepts, and the workspace its build may use."""

    batch_min: int = 1
    batch_opt: int = 64
    batch_max: int = 256
    workspace_mib: int = 1024

    def __post_init__(self) -> None:
        if not 1 <= self.batch_min <= self.batch_opt <= self.batch_max:
            raise VqtoolError(
                f"need 1 <= --batch-min <= --batch-opt <= --batch-max, got {self.batch_min}, {self.batch_opt}, "
                f"{self.batch_max}"
            )
        if self.workspace_mib < 16:
            raise VqtoolError(f"--workspace must be at least 16 MiB, got {self.workspace_mib}")


def _parse(parser: trt.OnnxParser, onnx_path: Path) -> None:
    """Parse the graph, collecting every parser error into one message."""
    if parser.parse_from_file(str(onnx_path)):
        return
    errors = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        errors.append(f"node {error.node()} ({error.node_name()}, {error.node_operator()}): {error.desc()}")
    raise VqtoolError(f"TensorRT's ONNX parser rejected the graph: {'; '.join(errors) or 'no reason given'}", onnx_path)


def build_engine(
    gpu: GpuIdentity,
    onnx_path: Path,
    engine_path: Path,
    *,
    input_name: str,
    output_name: str,
    input_tail: tuple[int, ...],
    precision: str,
    profile: EngineProfile,
    timing_cache: Path,
) -> EngineMetadata:
    """Build one engine with a dynamic-batch profile; write it and its build record atomically.

    Call vqtool.trt_runtime.require_tensorrt_gpu() first: it turns a missing TensorRT into one sentence.
    """
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    _parse(parser, onnx_path)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, profile.workspace_mib << 20)
    config.clear_flag(trt.BuilderFlag.TF32)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    shapes = [(b, *input_tail) for b in (profile.batch_min, profile.batch_opt, profile.batch_max)]
    optimisation = builder.create_optimization_profile()
    optimisation.set_shape(input_name, *(trt.Dims(list(shape)) for shape in shapes))
    config.add_optimization_profile(optimisation)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise VqtoolError("TensorRT could not build an engine (see its log above)", onnx_path)
    write_bytes(engine_path, bytes(memoryview(serialized)))
    # The cache grew during this build; keep it so the next build of any graph skips those timings.
    write_bytes(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    meta = EngineMetadata(
        tensorrt_version=str(trt.__version__),
        gpu_name=gpu.name,
        compute_capability=gpu.compute_capability,
        precision=precision,
        input=input_name,
        output=output_name,
        profile_min=list(shapes[0]),
        profile_opt=list(shapes[1]),
        profile_max=list(shapes[2]),
        onnx_file=onnx_path.name,
        onnx_sha256=sha256_file(onnx_path),
        engine_sha256=sha256_file(engine_path),
        workspace_bytes=profile.workspace_mib << 20,
        strongly_typed=True,
        tf32=False,
    )
    write_json(metadata_path(engine_path), meta.to_dict())
    return meta

"""Build TensorRT engines from the exported ONNX graphs (TensorRT 10 Python API).

Networks are always strongly typed: precision comes from the ONNX graph itself (the FP16 graphs
carry their own casts, with the quantizer kept in FP32), because TensorRT 10.12 deprecates the
FP16 builder flag and TensorRT 11 removes it. TF32 is switched off so that an FP32 engine's
distances and ArgMin match PyTorch's FP32 codes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vqtool.errors import VqtoolError
from vqtool.formats.atomic import write_bytes, write_json
from vqtool.formats.manifest import sha256_file
from vqtool.runtime.tensorrt import DEFAULT_BATCH_PROFILE, EngineMetadata, GpuIdentity, metadata_path, trt_logger

if TYPE_CHECKING:
    import tensorrt as trt


@dataclass(frozen=True)
class EngineProfile:
    """The dynamic batch range one engine accepts, and the workspace its build may use."""

    batch_min: int = DEFAULT_BATCH_PROFILE[0]
    batch_opt: int = DEFAULT_BATCH_PROFILE[1]
    batch_max: int = DEFAULT_BATCH_PROFILE[2]
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


def default_timing_cache(tensorrt_version: str, gpu: GpuIdentity) -> Path:
    """One timing cache per user, TensorRT version and GPU: TensorRT refuses a cache made by another of either."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    gpu_key = re.sub(r"[^A-Za-z0-9.]+", "-", gpu.name).strip("-")
    return root / "vqtool" / f"tensorrt-{tensorrt_version}-{gpu_key}-sm{gpu.compute_capability}.timing-cache"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock beside `path`: builds running at once would otherwise drop each other's timings."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _cache_from(config: trt.IBuilderConfig, path: Path) -> trt.ITimingCache | None:
    """The cache stored at `path`, or None when there is none or TensorRT cannot read it (corrupt, other version)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return config.create_timing_cache(data)  # None (not an exception) for bytes TensorRT cannot read
    except Exception:  # noqa: BLE001 - some builds raise instead; either way the file is of no use
        return None


def attach_timing_cache(config: trt.IBuilderConfig, path: Path, log: Callable[[str], None]) -> None:
    """Start the build from the cache at `path` when TensorRT accepts it, else from an empty one (said in one line)."""
    cache = _cache_from(config, path)
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return
    if path.is_file():
        log(
            f"warning: {path}: TensorRT cannot use this timing cache (corrupt, or from another GPU or TensorRT); "
            "building with a fresh one"
        )
    fresh = config.create_timing_cache(b"")
    if fresh is None or not config.set_timing_cache(fresh, ignore_mismatch=False):
        raise VqtoolError("TensorRT could not start an empty timing cache")


def save_timing_cache(config: trt.IBuilderConfig, path: Path, log: Callable[[str], None]) -> None:
    """Merge what this build timed into the cache file, under a lock, as Polygraphy does; never fail the build."""
    grown = config.get_timing_cache()
    if grown is None:
        log(f"warning: TensorRT kept no timing cache for this build; {path} is unchanged")
        return
    with _locked(path):
        previous = _cache_from(config, path)  # another build may have written it since this one started
        if previous is not None and not grown.combine(previous, ignore_mismatch=True):
            log(f"warning: {path}: could not merge the earlier timings (another TensorRT version); replacing them")
        write_bytes(path, bytes(memoryview(grown.serialize())))


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
    log: Callable[[str], None] = print,
) -> EngineMetadata:
    """Build one engine with a dynamic-batch profile; write it and its build record atomically.

    Call vqtool.trt_runtime.require_tensorrt_gpu() first: it turns a missing TensorRT into one sentence.
    """
    import tensorrt as trt

    logger = trt_logger()
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    _parse(parser, onnx_path)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, profile.workspace_mib << 20)
    config.clear_flag(trt.BuilderFlag.TF32)
    attach_timing_cache(config, timing_cache, log)

    shapes = [(b, *input_tail) for b in (profile.batch_min, profile.batch_opt, profile.batch_max)]
    optimisation = builder.create_optimization_profile()
    optimisation.set_shape(input_name, *(trt.Dims(list(shape)) for shape in shapes))
    config.add_optimization_profile(optimisation)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise VqtoolError("TensorRT could not build an engine (see its log above)", onnx_path)
    write_bytes(engine_path, bytes(memoryview(serialized)))
    # The cache grew during this build; keep it so the next build of any graph skips those timings.
    save_timing_cache(config, timing_cache, log)
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

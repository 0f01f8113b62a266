"""manifest.json: what an export directory holds, enough to run and verify it without the checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vqtool.errors import VqtoolError
from vqtool.formats.onnx_graph import check_self_contained
from vqtool.precisions import FP32, TABLE

MANIFEST_NAME = "manifest.json"
FORMAT = "vqtool.export"
FORMAT_VERSION = 1
# The other files of an export folder: the slim PyTorch checkpoint that parity and --backend torch run, and the
# records `vqtool parity` and `vqtool bench` keep (vqtool.formats.records).
PYTORCH_FILE = "model.pt"
PARITY_NAME = "parity.json"
BENCH_NAME = "bench.json"
BENCH_FORMAT = "vqtool.bench"
# The folder ONNX Runtime's TensorRT provider caches its engines in, inside the export (built from its graphs).
ORT_TRT_CACHE = "ort_trt_cache"
ROLES = ("encoder", "decoder")
# The graphs `export --latents` adds, for diffusion pipelines that hand latents rather than codes: uint8 images ->
# the latents before quantisation (the library's encode(x).latents), and latents -> uint8 images, decoded as the
# model's pipeline decodes them (LATENT_DECODES: quantising them first, or directly).
LATENT_ROLES = ("encoder_latents", "decoder_latents")
QUANTIZE, DIRECT = "quantize", "direct"
LATENT_DECODES = (QUANTIZE, DIRECT)


def graph_key(role: str, precision: str) -> str:
    """Manifest key and file stem of the graph `role` runs at `precision` (the precision table says which graph a
    precision runs): encoder, decoder, encoder.fp16, decoder.fp16, encoder.int8 (and *.fp16-naive), and the latent
    graphs encoder_latents, decoder_latents (and their .fp16)."""
    if role not in ROLES + LATENT_ROLES or precision not in TABLE:
        raise VqtoolError(f"unknown graph {role}/{precision}")
    graph = TABLE[precision].graph
    return role if graph == FP32 else f"{role}.{graph}"


# What a batch may take: ONNX Runtime's peak per image was ~12 times the graph's largest activation on the
# latent-diffusion VQ-f4 encoder at 256 x 256 (skip connections, the convolutions' im2col workspace), and a batch
# holds as many images as fit ACTIVATION_BUDGET at that rate. Graphs whose activations reach
# LARGE_ACTIVATION_BYTES per image run without ONNX Runtime's memory pattern, and on its intra-op threads
# rather than in lanes (OnnxRuntimeRunner in runtime/onnxruntime.py applies both).
ACTIVATION_BUDGET = 768 * 2**20
LIVE_ACTIVATIONS = 12
LARGE_ACTIVATION_BYTES = 2**20


def fitting_batch(manifest: Manifest, role: str, precision: str, requested: int, pixels: int | None = None) -> int:
    """`requested`, or fewer where that many images' activations would not fit ACTIVATION_BUDGET: a 256 x 256
    latent-diffusion tokenizer holds ~32 MB per image in one activation, vqtool's own 32 x 32 models ~0.1 MB.
    `pixels`: the images' size where it is not the model's own (activations grow with it)."""
    return batch_within_budget(activation_bytes(manifest, role, precision, pixels), requested)


def activation_bytes(manifest: Manifest, role: str, precision: str, pixels: int | None = None) -> int:
    """The largest activation of one image in the graph (0: not measured), at `pixels` pixels per image (default:
    the model's own size); activations of these fully convolutional graphs grow with the image's area."""
    entry = manifest.graphs.get(graph_key(role, precision))
    measured = entry.activation_bytes if entry else 0
    return measured if pixels is None else -(-measured * pixels // manifest.image_size**2)


def batch_within_budget(activation_bytes: int, requested: int) -> int:
    """`requested`, or as many images as fit ACTIVATION_BUDGET for a graph whose largest activation per image is
    `activation_bytes` (0: not measured, `requested`)."""
    per_image = activation_bytes * LIVE_ACTIVATIONS
    if per_image <= 0:
        return requested
    return max(1, min(requested, ACTIVATION_BUDGET // per_image))


def engine_path(export_dir: Path, role: str, precision: str) -> Path:
    """The TensorRT engine `vqtool export --trt` builds from a graph: its file stem with .engine."""
    return export_dir / f"{graph_key(role, precision)}.engine"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# The types codes are written in, smallest first.
CODE_DTYPES = ("uint8", "uint16", "uint32")


def code_dtype_for(num_codes: int) -> np.dtype:
    """The smallest unsigned integer type that holds codes 0..K-1."""
    for name in CODE_DTYPES:
        if num_codes - 1 <= np.iinfo(name).max:
            return np.dtype(name)
    raise ValueError(f"{num_codes} codes do not fit in 32 bits")


@dataclass(frozen=True)
class GraphEntry:
    """One exported graph: file name, checksum, precision and tensor names."""

    file: str
    sha256: str
    precision: str
    input: str
    output: str
    # Bytes of the largest activation one image makes inside the graph at the model's size (0: not measured).
    activation_bytes: int = 0


@dataclass(frozen=True)
class Manifest:
    """The export's model configuration, graphs and provenance."""

    model_config: dict[str, Any]
    image_size: int
    grid: int
    codes: int
    code_dtype: str
    opset: int
    checkpoint_sha256: str
    graphs: dict[str, GraphEntry]
    vqtool_version: str
    torch_version: str
    pytorch_file: str = ""
    pytorch_sha256: str = ""
    # How decoder_latents decodes (QUANTIZE or DIRECT); "": the export has no latent graphs.
    latent_decode: str = ""
    # D of the latents N x D x h x w the latent graphs give and take (0: no latent graphs).
    latent_channels: int = 0
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def downsample(self) -> int:
        """Image side / code-grid side: 16 for the reference design, 8, 4 or 2 for the family's others."""
        return self.image_size // self.grid

    @property
    def roles(self) -> tuple[str, ...]:
        """The graphs this export has: both, or "encoder" alone for a model with no decoder."""
        return tuple(role for role in ROLES if graph_key(role, "fp32") in self.graphs)

    def require(self, export_dir: Path, role: str) -> None:
        """One sentence where the model has no such graph (an encoder-only import, an export without latents)."""
        if role in LATENT_ROLES:
            if graph_key(role, FP32) not in self.graphs:
                raise VqtoolError("this export has no latent graphs; export again with --latents", export_dir)
            return
        if role not in self.roles:
            name = self.model_config.get("class_name", "this model")
            raise VqtoolError(
                f"{name} has no {role} (its library implements only its {' and '.join(self.roles)}); this export "
                f"can only {'encode' if role == 'decoder' else 'decode'}",
                export_dir,
            )

    def graph_path(self, export_dir: Path, name: str) -> Path:
        if name not in self.graphs:
            raise VqtoolError(f"export has no '{name}' graph (it has: {', '.join(sorted(self.graphs))})", export_dir)
        return export_file(export_dir, self.graphs[name].file)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_manifest(export_dir: Path) -> Manifest:
    """Load and check EXPORT_DIR/manifest.json, with one-line errors naming the file."""
    path = export_dir / MANIFEST_NAME
    if not export_dir.is_dir():
        raise VqtoolError("no such export folder (make one with: vqtool export CHECKPOINT --out DIR)", export_dir)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise VqtoolError("no manifest.json here; is this an export folder made by vqtool export?", path) from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise VqtoolError(f"corrupt manifest ({exc})", path) from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise VqtoolError(f"not a vqtool export manifest (no '{FORMAT}' format field)", path)
    if type(raw.get("format_version", 0)) is not int:
        raise VqtoolError("incomplete or damaged manifest ('format_version' must be an integer); re-export", path)
    if raw.get("format_version", 0) > FORMAT_VERSION:
        raise VqtoolError(f"written by a newer vqtool (format {raw['format_version']}); upgrade vqtool", path)
    problem = _manifest_problem(raw)
    if problem:
        raise VqtoolError(f"incomplete or damaged manifest ({problem}); re-export", path)
    try:
        raw["graphs"] = {name: GraphEntry(**entry) for name, entry in raw["graphs"].items()}
        return Manifest(**raw)
    except (KeyError, TypeError) as exc:
        raise VqtoolError(f"incomplete manifest ({exc})", path) from None


def _manifest_problem(raw: dict[str, Any]) -> str | None:
    """What is wrong with a parsed manifest's fields, or None; each later use relies on these types."""
    for name in ("image_size", "grid", "codes", "opset"):
        if type(raw.get(name)) is not int or raw[name] < 1:
            return f"'{name}' must be a positive integer"
    if raw["codes"] < 2:
        return "'codes' must be at least 2"
    if raw.get("code_dtype") not in ("uint8", "uint16", "uint32"):
        return "'code_dtype' must be uint8, uint16 or uint32"
    if not isinstance(raw.get("model_config"), dict):
        return "'model_config' must be an object"
    for name in ("checkpoint_sha256", "vqtool_version", "torch_version", "pytorch_file", "pytorch_sha256"):
        if not isinstance(raw.get(name, ""), str):
            return f"'{name}' must be a string"
    graphs = raw.get("graphs")
    # An encoder-only model (an imported one whose library has no decoder) says so in its configuration.
    needed = ("encoder", "decoder") if raw["model_config"].get("decoder", True) else ("encoder",)
    if not isinstance(graphs, dict) or any(role not in graphs for role in needed):
        return f"'graphs' must list at least the {' and the '.join(needed)}"
    entry_fields = ("file", "sha256", "precision", "input", "output")
    for name, entry in graphs.items():
        activation = entry.get("activation_bytes", 0) if isinstance(entry, dict) else 0
        if type(activation) is not int or activation < 0:
            return f"graph '{name}' must have a non-negative integer 'activation_bytes'"
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in entry_fields):
            return f"graph '{name}' must give {', '.join(entry_fields)} as strings"
        if not _plain_name(entry["file"]):
            return f"graph '{name}' must name a file inside the export folder"
    if raw.get("latent_decode", "") not in ("", *LATENT_DECODES):
        return f"'latent_decode' must be one of {', '.join(LATENT_DECODES)}"
    if type(raw.get("latent_channels", 0)) is not int or raw.get("latent_channels", 0) < 0:
        return "'latent_channels' must be a non-negative integer"
    if raw.get("pytorch_file") and not _plain_name(raw["pytorch_file"]):
        return "'pytorch_file' must name a file inside the export folder"
    return None


def _plain_name(name: str) -> bool:
    """A file name with no folder in it: the manifest's files all lie in its own folder."""
    return os.path.basename(name) == name and name not in ("", ".", "..")


def export_file(export_dir: Path, name: str) -> Path:
    """The file `name` of the export in `export_dir`, refused where it is a link that leads out of the folder: an
    export from elsewhere is data, and makes vqtool read nothing outside its own folder."""
    path = export_dir / name
    if path.is_symlink() and not path.resolve().is_relative_to(export_dir.resolve()):
        raise VqtoolError("is a link to a file outside the export folder; an export's files must lie inside it", path)
    return path


def verify_graph(export_dir: Path, manifest: Manifest, name: str) -> Path:
    """The graph's path, after checking that its bytes are the ones the manifest recorded and that it reads no other
    file (no external data)."""
    path = manifest.graph_path(export_dir, name)
    if not path.is_file():
        raise VqtoolError("graph file listed in manifest.json is missing", path)
    if sha256_file(path) != manifest.graphs[name].sha256:
        raise VqtoolError(
            "graph file does not match the checksum in manifest.json (changed or corrupt); re-export", path
        )
    check_self_contained(path)
    return path


def verify_pytorch_file(export_dir: Path, manifest: Manifest) -> Path:
    """The export's PyTorch checkpoint (model.pt), after checking it lies in the folder and, where the manifest
    recorded its checksum, that its bytes are those."""
    path = export_file(export_dir, manifest.pytorch_file or PYTORCH_FILE)
    if not path.is_file():
        raise VqtoolError("the PyTorch file listed in manifest.json is missing", path)
    if manifest.pytorch_sha256 and sha256_file(path) != manifest.pytorch_sha256:
        raise VqtoolError("does not match the checksum in manifest.json; re-export", path)
    return path


def manifest_checksum(export_dir: Path) -> str:
    return sha256_file(export_dir / MANIFEST_NAME)

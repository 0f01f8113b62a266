"""The two deployable graphs as PyTorch modules (images -> codes, codes -> images), and writing them as ONNX.

Pre- and post-processing, the distance, the ArgMin and the codebook lookup all live inside them,
so a runtime needs nothing but the graph. `precision` decides where FP16 is used:
  fp32        everything in FP32;
  fp16        convolutions in FP16, the distance/ArgMin and codebook in FP32 (a cast island);
  fp16-naive  everything in FP16, kept only to show what the island buys.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import vqtool
from vqtool.errors import VqtoolError, missing_extra
from vqtool.formats.manifest import QUANTIZE, GraphEntry, graph_key, sha256_file
from vqtool.model.face import GraphParts, TokenizerModel
from vqtool.model.vqvae import nearest_codes
from vqtool.precisions import ROWS as PRECISION_ROWS

# Each graph precision's (dtype of the convolutions, dtype of the codebook and distances): the precision table's.
GRAPH_DTYPES = {
    row.name: (getattr(torch, row.arithmetic[0]), getattr(torch, row.arithmetic[1]))
    for row in PRECISION_ROWS
    if row.arithmetic is not None
}
# TensorRT 10's ONNX parser reads opsets 9..20; 18 is well inside what every runtime we target reads.
OPSET = 18
ENCODER_INPUT, ENCODER_OUTPUT = "images", "codes"
DECODER_INPUT, DECODER_OUTPUT = "codes", "images"
LATENTS = "latents"


def _dtypes(precision: str) -> tuple[torch.dtype, torch.dtype]:
    """(dtype of the convolutions, dtype of the codebook and distances)."""
    if precision not in GRAPH_DTYPES:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(GRAPH_DTYPES)}")
    return GRAPH_DTYPES[precision]


class EncoderGraph(nn.Module):
    """uint8 N x H x W x 3 -> int32 codes N x H/F x W/F (F: the model's downsampling factor): the model's input
    scaling, its encoder body at the graph's precision, and the search in the quantizer's (an FP32 island in the
    FP16 graph): any projection and normalisation, distances in the expanded form (one matrix product; never an
    exported cdist, whose ONNX form is slow or missing), ArgMin."""

    codebook: torch.Tensor  # buffers, in the quantizer's precision
    code_sq: torch.Tensor

    def __init__(self, parts: GraphParts, precision: str = "fp32") -> None:
        super().__init__()
        self.conv_dtype, self.code_dtype = _dtypes(precision)
        self.input_scaling = copy.deepcopy(parts.input_scaling)
        self.body = _at_precision(parts.encoder_body, self.conv_dtype)
        self.search_prefix = _copy_to(parts.search_prefix, self.code_dtype)
        self.cosine = parts.cosine
        codebook = parts.search_codebook.detach().float()
        self.register_buffer("codebook", codebook.to(self.code_dtype).clone())
        # |e|^2 is computed in FP32 from the FP32 codebook, exactly as the PyTorch model does.
        self.register_buffer("code_sq", (codebook * codebook).sum(dim=-1).to(self.code_dtype))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.input_scaling(images).to(self.conv_dtype)
        return nearest_codes(
            self.body(x).to(self.code_dtype), self.codebook, self.code_sq, self.search_prefix, self.cosine
        )


def _copy_to(module: nn.Module | None, dtype: torch.dtype) -> nn.Module | None:
    return copy.deepcopy(module).to(dtype) if module is not None else None


class FourPhaseConvTranspose(nn.Module):
    """ConvTranspose2d(kernel 4, stride 2, padding 1) computed as four 2x2 convolutions, one per output phase.

    Along each axis, even outputs are w[3]·x[m-1] + w[1]·x[m] and odd outputs w[2]·x[m] + w[0]·x[m+1], so
    each phase is a plain 2x2 convolution (same multiply-adds as the transposed one), and DepthToSpace
    interleaves the phases. The result equals the transposed convolution up to float rounding.
    """

    TAPS = {0: (3, 1), 1: (2, 0)}  # kernel taps over (m-1, m) for even outputs, (m, m+1) for odd

    def __init__(self, deconv: nn.ConvTranspose2d) -> None:
        super().__init__()
        if deconv.kernel_size != (4, 4) or deconv.stride != (2, 2) or deconv.padding != (1, 1):
            raise ValueError("only ConvTranspose2d(kernel 4, stride 2, padding 1) has this four-phase form")
        weight = deconv.weight.detach()  # C_in x C_out x 4 x 4
        phases = []
        for dy in (0, 1):
            for dx in (0, 1):
                rows = [torch.stack([weight[:, :, ky, kx] for kx in self.TAPS[dx]], -1) for ky in self.TAPS[dy]]
                phases.append(torch.stack(rows, -2).permute(1, 0, 2, 3).contiguous())  # C_out x C_in x 2 x 2
        self.phase_weights = nn.ParameterList([nn.Parameter(w, requires_grad=False) for w in phases])
        bias = deconv.bias.detach() if deconv.bias is not None else torch.zeros(weight.shape[1])
        self.bias = nn.Parameter(bias.clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = []
        for index, (dy, dx) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
            padded = F.pad(x, (1 - dx, dx, 1 - dy, dy))
            outputs.append(F.conv2d(padded, self.phase_weights[index], self.bias))
        phased = torch.stack(outputs, dim=2)  # N x C x 4 x h x w, phase = 2*dy + dx
        n, c, _, h, w = phased.shape
        return F.pixel_shuffle(phased.reshape(n, c * 4, h, w), 2)


# ONNX Runtime's CPU ConvTranspose is slow on deep, low-resolution layers; as four convolutions they take its
# fast NCHWc path. Three of the four layers: the last has 3 output channels, a poor fit for NCHWc blocks, and
# ran slower so (docs/design-measurements.md, "Decoder graph").
FOUR_PHASE_LAYERS = 3


# Layers an imported model's FP16 graphs keep in FP32: normalisation (its variance of FP16 activations loses
# the small differences codes are decided by) and attention (its softmax over a whole feature map), known by
# their class (GroupNorm and the libraries' subclasses) or their name (Attention, AttnBlock, AttentionBlock).
FP32_NORMS = (nn.GroupNorm,)
FP32_NAMES = ("Attention", "AttnBlock")


def _kept_in_fp32(layer: nn.Module) -> bool:
    return isinstance(layer, FP32_NORMS) or any(name in type(layer).__name__ for name in FP32_NAMES)


class _InFP32(nn.Module):
    """One layer run in FP32 inside an FP16 graph: its tensor inputs cast up, its output cast back."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer.float()

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> Any:
        def up(value: object) -> object:
            return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value

        out = self.layer(x.float(), *map(up, args), **{k: up(v) for k, v in kwargs.items()})
        if isinstance(out, tuple):  # transformers' attention blocks return (output, weights)
            return tuple(o.to(x.dtype) if isinstance(o, torch.Tensor) else o for o in out)
        return out.to(x.dtype)


def _at_precision(body: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of `body` in `dtype`; in FP16, with normalisation and attention kept in FP32 (_kept_in_fp32)."""
    body = copy.deepcopy(body).to(dtype)
    if dtype == torch.float32:
        return body

    def keep(module: nn.Module) -> None:
        for name, child in module.named_children():
            if _kept_in_fp32(child):
                setattr(module, name, _InFP32(child))
            else:
                keep(child)

    keep(body)
    return body


def _four_phase(body: nn.Module) -> nn.Module:
    """`body` with its first FOUR_PHASE_LAYERS transposed convolutions (kernel 4, stride 2, padding 1), in module
    order, as four-phase convolutions."""
    converted = 0

    def convert(module: nn.Module) -> None:
        nonlocal converted
        for name, child in module.named_children():
            if converted == FOUR_PHASE_LAYERS:
                return
            if isinstance(child, nn.ConvTranspose2d) and child.kernel_size == (4, 4) and child.stride == (2, 2):
                setattr(module, name, FourPhaseConvTranspose(child))
                converted += 1
            else:
                convert(child)

    convert(body)
    return body


class DecoderGraph(nn.Module):
    """int32 codes N x h x w -> uint8 images N x Fh x Fw x 3 (F: the model's downsampling factor): the lookup (and
    any back-projection) at the quantizer's precision, the decoder body at the graph's, the output scaling."""

    codebook: torch.Tensor  # a buffer

    def __init__(self, parts: GraphParts, precision: str = "fp32") -> None:
        super().__init__()
        if parts.decoder_body is None:
            raise ValueError("this model has no decoder")
        self.conv_dtype, self.code_dtype = _dtypes(precision)
        self.register_buffer("codebook", parts.decode_codebook.detach().float().to(self.code_dtype).clone())
        self.lookup_suffix = _copy_to(parts.lookup_suffix, self.code_dtype)
        self.body = _four_phase(_at_precision(parts.decoder_body, self.conv_dtype))
        self.output_scaling = copy.deepcopy(parts.output_scaling)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        vectors = F.embedding(codes, self.codebook)
        if self.lookup_suffix is not None:
            vectors = self.lookup_suffix(vectors)
        return self.output_scaling(self.body(vectors.to(self.conv_dtype)))


class EncoderLatentsGraph(nn.Module):
    """uint8 N x H x W x 3 -> float32 latents N x D x h x w, before quantisation and in the library's layout (what
    diffusers' encode(x).latents gives): the model's input scaling and its encoder body, no search."""

    def __init__(self, parts: GraphParts, precision: str = "fp32") -> None:
        super().__init__()
        self.conv_dtype, _ = _dtypes(precision)
        self.input_scaling = copy.deepcopy(parts.input_scaling)
        self.body = _at_precision(parts.encoder_body, self.conv_dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        latents = self.body(self.input_scaling(images).to(self.conv_dtype))
        return latents.to(torch.float32).permute(0, 3, 1, 2)


class DecoderLatentsGraph(nn.Module):
    """float32 latents N x D x h x w (the library's layout) -> uint8 images, decoded as the model's pipeline decodes
    them: quantised first (latent diffusion's vqvae.decode: the nearest code's vector, searched as the encoder
    graph searches, in the quantizer's precision) or directly (Kandinsky's movq.decode(force_not_quantize=True))."""

    codebook: torch.Tensor  # buffers
    code_sq: torch.Tensor
    vectors: torch.Tensor

    def __init__(self, parts: GraphParts, quantize: bool, precision: str = "fp32") -> None:
        super().__init__()
        if parts.decoder_body is None:
            raise ValueError("this model has no decoder")
        self.conv_dtype, self.code_dtype = _dtypes(precision)
        self.quantize = quantize
        self.search_prefix = _copy_to(parts.search_prefix, self.code_dtype)
        self.cosine = parts.cosine
        search = parts.search_codebook.detach().float()
        self.register_buffer("codebook", search.to(self.code_dtype).clone())
        self.register_buffer("code_sq", (search * search).sum(dim=-1).to(self.code_dtype))
        self.register_buffer("vectors", parts.decode_codebook.detach().float().to(self.code_dtype).clone())
        self.lookup_suffix = _copy_to(parts.lookup_suffix, self.code_dtype)
        self.body = _four_phase(_at_precision(parts.decoder_body, self.conv_dtype))
        self.output_scaling = copy.deepcopy(parts.output_scaling)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        vectors = latents.permute(0, 2, 3, 1)
        if self.quantize:
            codes = nearest_codes(
                vectors.to(self.code_dtype), self.codebook, self.code_sq, self.search_prefix, self.cosine
            )
            vectors = F.embedding(codes, self.vectors)
            if self.lookup_suffix is not None:
                vectors = self.lookup_suffix(vectors)
        return self.output_scaling(self.body(vectors.to(self.conv_dtype)))


# ---- writing them as ONNX ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[io.StringIO]:
    """torch.onnx narrates each stage on stdout and logs; keep the narration for error messages only."""
    captured = io.StringIO()
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # e.g. "torchvision is not installed. Skipping ..."
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(captured):
            warnings.simplefilter("ignore")
            yield captured
    finally:
        exporter_log.setLevel(level)


def _export_graph(
    module: torch.nn.Module,
    example: torch.Tensor,
    path: Path,
    names: tuple[str, str],
    spatial_scale: int | None,
    metadata: dict[str, str],
) -> None:
    """torch.onnx (dynamo) export with a dynamic batch and, given a `spatial_scale`, dynamic sides (multiples of
    it); then the full ONNX checker."""
    try:
        import onnx
    except ModuleNotFoundError:
        raise missing_extra("vqtool export", "onnx", "train") from None
    batch, height, width = torch.export.Dim("batch", min=1), torch.export.Dim("h", min=1), torch.export.Dim("w", min=1)
    dims = {0: batch} if spatial_scale is None else {0: batch, 1: spatial_scale * height, 2: spatial_scale * width}
    with _quiet_exporter() as narration:
        try:
            torch.onnx.export(
                module.eval(),
                (example,),
                str(path),
                input_names=[names[0]],
                output_names=[names[1]],
                opset_version=OPSET,
                dynamic_shapes={names[0]: dims},
                external_data=False,
                dynamo=True,
            )
        except Exception as exc:
            raise VqtoolError(f"torch.onnx could not export {path.name}: {exc}\n{narration.getvalue()}") from None
    graph = onnx.load(str(path))
    for tensor in (graph.graph.input[0], graph.graph.output[0]):
        if not tensor.type.tensor_type.shape.dim[0].dim_param:
            # torch.onnx falls back to fixed shapes where a model's code pins the batch; a graph that takes one
            # batch size only would fail at the first other one.
            raise VqtoolError(f"torch.onnx fixed the batch of {path.name}'s {tensor.name} (the model's code pins it)")
    for key, value in metadata.items():
        graph.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(graph, full_check=True)
    onnx.save(graph, str(path))


def write_graphs(model: TokenizerModel, checkpoint_sha: str, out_dir: Path, precision: str) -> dict[str, GraphEntry]:
    """Export the encoder and decoder at one precision into `out_dir`; returns their manifest entries.

    vqtool's own model takes any image side that is a multiple of its factor; an imported one runs at its own
    size (its attention and normalisation layers are exported for the shapes they were traced with)."""
    model, config = model.eval(), model.config
    size, grid = config.image_size, config.grid
    examples = torch.zeros(2, size, size, 3, dtype=torch.uint8), torch.zeros(2, grid, grid, dtype=torch.int32)
    meta = {
        "vqtool.model_config": json.dumps(config.to_dict()),
        "vqtool.checkpoint_sha256": checkpoint_sha,
        "vqtool.precision": precision,
        "vqtool.version": vqtool.__version__,
    }
    parts = model.graph_parts()
    graphs = (EncoderGraph(parts, precision), DecoderGraph(parts, precision) if model.has_decoder else nn.Identity())
    scales = (parts.dynamic_sides, 1 if parts.dynamic_sides else None)
    entries = {}
    written = (
        (graph_key("encoder", precision), graphs[0], examples[0], (ENCODER_INPUT, ENCODER_OUTPUT), scales[0]),
        (graph_key("decoder", precision), graphs[1], examples[1], (DECODER_INPUT, DECODER_OUTPUT), scales[1]),
    )
    for name, module, example, names, scale in written if model.has_decoder else written[:1]:
        path = out_dir / f"{name}.onnx"
        _export_graph(module, example, path, names, scale, {**meta, "vqtool.role": name.split(".")[0]})
        largest = largest_activation_bytes(module, example)
        entries[name] = GraphEntry(path.name, sha256_file(path), precision, names[0], names[1], largest)
    return entries


def refuse_latents_without_decoder(model: TokenizerModel) -> None:
    """The latent graphs need a decoder: a model without one is refused in one sentence."""
    if not model.has_decoder:
        name = model.config.to_dict().get("class_name", "this model")
        raise VqtoolError(f"{name} has no decoder: --latents needs one")


def write_latent_graphs(
    model: TokenizerModel, checkpoint_sha: str, out_dir: Path, precision: str, decode: str
) -> tuple[dict[str, GraphEntry], int]:
    """Export the latent graphs (`export --latents`) at one precision into `out_dir`; `decode` says whether the
    latent decoder quantises (QUANTIZE) or not (DIRECT). Returns their manifest entries and the latents' channels."""
    model, config = model.eval(), model.config
    refuse_latents_without_decoder(model)
    parts = model.graph_parts()
    size = config.image_size
    encoder = EncoderLatentsGraph(parts, precision)
    images = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    with torch.no_grad():
        latents = encoder(images)
    decoder = DecoderLatentsGraph(parts, decode == QUANTIZE, precision)
    meta = {
        "vqtool.model_config": json.dumps(config.to_dict()),
        "vqtool.checkpoint_sha256": checkpoint_sha,
        "vqtool.precision": precision,
        "vqtool.latent_decode": decode,
        "vqtool.version": vqtool.__version__,
    }
    scale = parts.dynamic_sides
    entries = {}
    for role, module, example, names, sides in (
        ("encoder_latents", encoder, images, (ENCODER_INPUT, LATENTS), scale),
        ("decoder_latents", decoder, torch.zeros_like(latents), (LATENTS, DECODER_OUTPUT), None),
    ):
        name = graph_key(role, precision)
        path = out_dir / f"{name}.onnx"
        _export_graph(module, example, path, names, sides, {**meta, "vqtool.role": role})
        largest = largest_activation_bytes(module, example)
        entries[name] = GraphEntry(path.name, sha256_file(path), precision, names[0], names[1], largest)
    return entries, int(latents.shape[1])


@torch.no_grad()
def largest_activation_bytes(module: nn.Module, example: torch.Tensor) -> int:
    """Bytes per image of the largest tensor any layer of `module` outputs for `example`: what batches are sized
    by (manifest.fitting_batch)."""
    largest = 0

    def measure(_: nn.Module, __: object, output: object) -> None:
        nonlocal largest
        for tensor in output if isinstance(output, tuple) else (output,):
            if isinstance(tensor, torch.Tensor):
                largest = max(largest, tensor.element_size() * tensor.numel() // len(example))

    hooks = [layer.register_forward_hook(measure) for layer in module.modules()]
    try:
        module(example)
    finally:
        for hook in hooks:
            hook.remove()
    return largest

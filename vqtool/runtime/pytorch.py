"""The PyTorch model itself as a runner: the one place the inference side loads PyTorch (export_dir/model.pt).

In FP32 it runs the model as it is: parity's reference and bench's baseline (for the latent graphs, the model's own
pipeline latents and decode: an imported model's are the library's). At a reduced precision (BF16 on the CPU
and CUDA, FP16 on CUDA: the precision table's `autocast`) it runs the pieces the exported graphs are made of
(GraphParts), the encoder and decoder bodies under torch.autocast and the nearest-code search and codebook lookup in
FP32, as the exported graphs keep their quantizer island; parity judges its codes under the contracts like any
other runtime's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vqtool.errors import VqtoolError, missing_extra
from vqtool.formats.manifest import LATENT_ROLES, QUANTIZE, Manifest, verify_pytorch_file
from vqtool.host import cpu_description
from vqtool.precisions import FP32
from vqtool.precisions import row as precision_row
from vqtool.runtime.base import GraphToOpen, Runner


class TorchRunner:
    """The exported PyTorch model itself (export_dir/model.pt): in FP32 for comparison and as a fallback, or its
    bodies under autocast at `precision`."""

    backend = "torch"

    def __init__(self, export_dir: Path, manifest: Manifest, role: str, device: str, precision: str = FP32) -> None:
        try:
            import torch
        except ModuleNotFoundError:
            raise missing_extra("--backend torch", "PyTorch", "train") from None
        from vqtool.model.checkpoint import CheckpointError, load_checkpoint

        if role in LATENT_ROLES and not manifest.latent_decode:
            raise VqtoolError(f"export has no {role} graph (export again with --latents)", export_dir)
        if device == "cuda" and not torch.cuda.is_available():
            raise VqtoolError("--backend torch --device cuda: PyTorch sees no CUDA GPU here")
        path = verify_pytorch_file(export_dir, manifest)
        self.device = torch.device(
            "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
        )
        row = precision_row(precision)
        if (self.backend, self.device.type) not in row.runtimes:
            there = " or ".join(d for b, d in row.runtimes if b == self.backend).upper()
            raise VqtoolError(f"--backend torch runs {precision} on {there} only, and PyTorch found no GPU here")
        autocast = row.autocast
        self.autocast = getattr(torch, autocast) if autocast is not None and precision != FP32 else None
        if self.autocast is not None:
            _check_arithmetic(torch, self.device.type, precision)
        if self.device.type == "cuda":
            # TF32 would round FP32 convolutions and matmuls to 10 mantissa bits: codes would stop being FP32's.
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        try:
            self.model = load_checkpoint(path).model.to(self.device).eval()
        except CheckpointError as exc:
            raise VqtoolError(str(exc)) from None
        self.role = role
        self.quantize = manifest.latent_decode == QUANTIZE
        self.provider = f"PyTorch {torch.__version__} on {self.device.type}"
        self.parts: Any = None
        if self.autocast is not None:
            self.parts = _parts_on(self.model.graph_parts(), self.device)
            book = self.parts.search_codebook
            self.code_sq = (book * book).sum(dim=-1)  # from the FP32 codebook, as the model and the graphs do
            self.provider += f", {precision.upper()} autocast with the quantizer in FP32"
        self.torch = torch

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            data = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
            if self.role == "encoder":
                result = self._encode(data).to(torch.int32)
            elif self.role == "decoder":
                result = self._decode(data.long())
            elif self.role == "encoder_latents":
                result = self._encode_latents(data).contiguous()
            else:
                result = self._decode_latents(data.float())
            array: np.ndarray = result.cpu().numpy()
            return array

    def _encode(self, images: Any) -> Any:
        """Codes: from the model in FP32, or from the encoder body under autocast and the search in FP32, as the
        encoder graph computes them."""
        from vqtool.model.vqvae import nearest_codes

        parts = self.parts
        if parts is None:
            return self.model.encode(self.model.model_input(images))
        latents = self._encoded(images)
        return nearest_codes(latents, parts.search_codebook, self.code_sq, parts.search_prefix, parts.cosine)

    def _encoded(self, images: Any) -> Any:
        """The encoder body's latents (N x h x w x D) under autocast, returned in FP32 for the search."""
        parts, torch = self.parts, self.torch
        with torch.autocast(self.device.type, dtype=self.autocast):
            latents = parts.encoder_body(parts.input_scaling(images))
        return latents.float()

    def _decode(self, codes: Any) -> Any:
        """Images: from the model in FP32, or from the codebook lookup in FP32 and the decoder body under autocast."""
        if self.parts is None:
            return self.model.model_output(self.model.decode(codes))
        return self._decoded(self._looked_up(codes))

    def _looked_up(self, codes: Any) -> Any:
        """The codes' vectors, in FP32 as the graphs look them up."""
        parts = self.parts
        vectors = self.torch.nn.functional.embedding(codes, parts.decode_codebook)
        return vectors if parts.lookup_suffix is None else parts.lookup_suffix(vectors)

    def _decoded(self, vectors: Any) -> Any:
        """The decoder body under autocast, its output scaled to uint8 in FP32."""
        parts, torch = self.parts, self.torch
        with torch.autocast(self.device.type, dtype=self.autocast):
            output = parts.decoder_body(vectors)
        return parts.output_scaling(output.float())

    def _encode_latents(self, images: Any) -> Any:
        """Latents N x D x h x w before quantisation: the model's own (the library's, for an imported model), or the
        encoder body under autocast, as encoder_latents computes them."""
        if self.parts is None:
            return self.model.pipeline_latents(self.model.model_input(images)).float()
        return self._encoded(images).permute(0, 3, 1, 2)

    def _decode_latents(self, latents: Any) -> Any:
        """Images from latents, decoded as the export's latent decoder does (through their nearest codes or as they
        are): by the model's own pipeline decode, or with the search and lookup in FP32 and the decoder body under
        autocast, as decoder_latents computes them."""
        from vqtool.model.vqvae import nearest_codes

        parts = self.parts
        if parts is None:
            return self.model.model_output(self.model.decode_pipeline_latents(latents, self.quantize))
        vectors = latents.permute(0, 2, 3, 1)
        if self.quantize:
            codes = nearest_codes(vectors, parts.search_codebook, self.code_sq, parts.search_prefix, parts.cosine)
            vectors = self._looked_up(codes)
        return self._decoded(vectors)

    def describe(self) -> str:
        return self.provider

    def pipelined(self) -> Runner:
        return self

    def close(self) -> None:
        pass


def _check_arithmetic(torch: Any, device: str, precision: str) -> None:
    """Refuse, in one sentence, a reduced precision this device has no arithmetic for: PyTorch would emulate it,
    slower than FP32."""
    missing = arithmetic_missing(torch, device, precision)
    if missing:
        raise VqtoolError(missing)


def arithmetic_missing(torch: Any, device: str, precision: str) -> str | None:
    """Why PyTorch has no arithmetic for `precision` (a reduced one) on `device` here; None where it has."""
    if device == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return f"this CPU has no BF16 arithmetic for PyTorch ({cpu_description()}); use fp32"
    if device == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        return f"this GPU ({torch.cuda.get_device_name()}) has no BF16 arithmetic; use fp16 or fp32"
    return None


def _parts_on(parts: Any, device: Any) -> Any:
    """The graph's pieces on `device` (the pixel scalings are built with their buffers on the CPU)."""
    from dataclasses import fields, replace

    moved = {f.name: getattr(parts, f.name) for f in fields(parts)}
    for name, value in moved.items():
        if hasattr(value, "to"):  # modules and tensors
            moved[name] = value.to(device)
    return replace(parts, **moved)


def load(graph: GraphToOpen) -> TorchRunner:
    """The runtime table's loader for the PyTorch model itself (the export's model.pt), on the CPU or CUDA, in FP32
    or at a precision it autocasts to."""
    export_dir, manifest = graph.export()
    return TorchRunner(export_dir, manifest, graph.role, graph.device, graph.precision)

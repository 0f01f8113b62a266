"""The two deployable graphs as PyTorch modules: images -> codes, and codes -> images.

Pre- and post-processing, the distance, the ArgMin and the codebook lookup all live inside them,
so a runtime needs nothing but the graph. `precision` decides where FP16 is used:
  fp32        everything in FP32;
  fp16        convolutions in FP16, the distance/ArgMin and codebook in FP32 (a cast island);
  fp16-naive  everything in FP16, kept only to show what the island buys.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from train.model import VQVAE, code_distances, images_to_input, output_to_images

PRECISIONS = ("fp32", "fp16", "fp16-naive")


def _dtypes(precision: str) -> tuple[torch.dtype, torch.dtype]:
    """(dtype of the convolutions, dtype of the codebook and distances)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return {
        "fp32": (torch.float32, torch.float32),
        "fp16": (torch.float16, torch.float32),
        "fp16-naive": (torch.float16, torch.float16),
    }[precision]


class EncoderGraph(nn.Module):
    """uint8 N x H x W x 3 -> int32 codes N x H/16 x W/16."""

    def __init__(self, model: VQVAE, precision: str = "fp32") -> None:
        super().__init__()
        self.conv_dtype, self.code_dtype = _dtypes(precision)
        self.encoder = copy.deepcopy(model.encoder).to(self.conv_dtype)
        self.before_quantize = copy.deepcopy(model.before_quantize).to(self.conv_dtype)
        codebook = model.quantizer.codebook.weight.detach()
        self.register_buffer("codebook", codebook.to(self.code_dtype).clone())
        # |e|^2 is computed in FP32 from the FP32 codebook, exactly as the PyTorch model does.
        self.register_buffer("code_sq", (codebook * codebook).sum(dim=-1).to(self.code_dtype))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images_to_input(images).to(self.conv_dtype)
        latents = self.before_quantize(self.encoder(x)).permute(0, 2, 3, 1).to(self.code_dtype)
        distances = code_distances(latents, self.codebook, self.code_sq)
        # int32: what TensorRT's ArgMin/TopK produces natively, and enough for any codebook.
        return torch.argmin(distances, dim=-1).to(torch.int32)


class DecoderGraph(nn.Module):
    """int32 codes N x h x w -> uint8 images N x 16h x 16w x 3."""

    def __init__(self, model: VQVAE, precision: str = "fp32") -> None:
        super().__init__()
        self.conv_dtype, self.code_dtype = _dtypes(precision)
        self.register_buffer("codebook", model.quantizer.codebook.weight.detach().to(self.code_dtype).clone())
        self.after_quantize = copy.deepcopy(model.after_quantize).to(self.conv_dtype)
        self.decoder = copy.deepcopy(model.decoder).to(self.conv_dtype)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        latents = F.embedding(codes, self.codebook).to(self.conv_dtype)
        output = self.decoder(self.after_quantize(latents.permute(0, 3, 1, 2)))
        return output_to_images(output)

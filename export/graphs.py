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

from vqtool.train.model import VQVAE, code_distances, images_to_input, l2_normalize, output_to_images

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
    """uint8 N x H x W x 3 -> int32 codes N x H/F x W/F (F: the model's downsampling factor)."""

    def __init__(self, model: VQVAE, precision: str = "fp32") -> None:
        super().__init__()
        self.conv_dtype, self.code_dtype = _dtypes(precision)
        self.encoder = copy.deepcopy(model.encoder).to(self.conv_dtype)
        self.before_quantize = copy.deepcopy(model.before_quantize).to(self.conv_dtype)
        # The projection and normalisation belong to the quantizer: they run at its precision (the FP32 island).
        quantizer = copy.deepcopy(model.quantizer).to(self.code_dtype)
        self.project_in, self.l2 = quantizer.project_in, quantizer.l2
        codebook = model.quantizer.search_codebook().detach()
        self.register_buffer("codebook", codebook.to(self.code_dtype).clone())
        # |e|^2 is computed in FP32 from the FP32 codebook, exactly as the PyTorch model does.
        self.register_buffer("code_sq", (codebook * codebook).sum(dim=-1).to(self.code_dtype))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images_to_input(images).to(self.conv_dtype)
        latents = self.before_quantize(self.encoder(x)).permute(0, 2, 3, 1).to(self.code_dtype)
        if self.project_in is not None:
            latents = self.project_in(latents)
        if self.l2:
            latents = l2_normalize(latents)
        distances = code_distances(latents, self.codebook, self.code_sq)
        # int32: what TensorRT's ArgMin/TopK produces natively, and enough for any codebook.
        return torch.argmin(distances, dim=-1).to(torch.int32)


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


# ONNX Runtime's CPU ConvTranspose is slow on deep, low-resolution layers (measured on the default model:
# the 2x2 -> 4x4 layer alone took 41% of decode); as four convolutions they take its fast NCHWc path.
# Three of the four layers: against two, decode at batch 32/256 ran 5-15% faster; all four was slower
# than three (the last layer has 3 output channels, a poor fit for NCHWc blocks).
FOUR_PHASE_LAYERS = 3


class DecoderGraph(nn.Module):
    """int32 codes N x h x w -> uint8 images N x Fh x Fw x 3 (F: the model's downsampling factor)."""

    def __init__(self, model: VQVAE, precision: str = "fp32") -> None:
        super().__init__()
        self.conv_dtype, self.code_dtype = _dtypes(precision)
        # The lookup and back-projection run at the quantizer's precision, the decoder at the convolutions'.
        self.register_buffer("codebook", model.quantizer.search_codebook().detach().to(self.code_dtype).clone())
        self.project_out = copy.deepcopy(model.quantizer.project_out)
        if self.project_out is not None:
            self.project_out = self.project_out.to(self.code_dtype)
        after, converted = model.after_quantize, 0
        if isinstance(after, nn.ConvTranspose2d):
            after, converted = FourPhaseConvTranspose(after), 1
        self.after_quantize = copy.deepcopy(after).to(self.conv_dtype)
        layers = []
        for layer in model.decoder:
            if isinstance(layer, nn.ConvTranspose2d) and converted < FOUR_PHASE_LAYERS:
                layers.append(FourPhaseConvTranspose(layer))
                converted += 1
            else:
                layers.append(copy.deepcopy(layer))
        self.decoder = nn.Sequential(*layers).to(self.conv_dtype)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        latents = F.embedding(codes, self.codebook)
        if self.project_out is not None:
            latents = self.project_out(latents)
        output = self.decoder(self.after_quantize(latents.to(self.conv_dtype).permute(0, 3, 1, 2)))
        return output_to_images(output)

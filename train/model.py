"""The VQ-VAE of the reference design: encoder -> nearest-code quantizer -> decoder."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from vqtool.train.config import ModelConfig


# Both conversions cast before/after the transpose: TensorRT allows UINT8 only on the network's
# inputs and outputs, so no layer inside an exported graph may see a uint8 tensor.
def images_to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 N x H x W x 3 -> float N x 3 x H x W in [-1, 1], the model's input scale."""
    return images.to(torch.float32).permute(0, 3, 1, 2) / 127.5 - 1.0


def output_to_images(output: torch.Tensor) -> torch.Tensor:
    """float N x 3 x H x W (model scale) -> uint8 N x H x W x 3, rounded to the nearest grey level."""
    pixels = ((output.to(torch.float32) + 1.0) * 127.5).clamp(0.0, 255.0).round()
    return pixels.permute(0, 2, 3, 1).to(torch.uint8)


def code_distances(latents: torch.Tensor, codebook: torch.Tensor, code_sq: torch.Tensor | None = None) -> torch.Tensor:
    """Squared L2 distance from each latent (..., D) to each code (K, D) -> (..., K).

    Written as |z|^2 - 2 z.E^T + |e|^2: one matrix product, which is what both PyTorch and the
    exported graph compute, so their argmins differ only by float rounding. An exported graph
    passes |e|^2 precomputed, so it is a constant there rather than work per image.
    """
    latent_sq = (latents * latents).sum(dim=-1, keepdim=True)
    if code_sq is None:
        code_sq = (codebook * codebook).sum(dim=-1)
    return latent_sq - 2.0 * torch.matmul(latents, codebook.t()) + code_sq


class Quantizer(nn.Module):
    """Codebook of K vectors; each latent is replaced by its nearest code (L2)."""

    def __init__(self, codes: int, dim: int) -> None:
        super().__init__()
        self.codebook = nn.Embedding(codes, dim)
        # The article's Embedding uses uniform(-1/K, 1/K), as in the original VQ-VAE code.
        self.codebook.weight.data.uniform_(-1.0 / codes, 1.0 / codes)

    def nearest(self, latents: torch.Tensor) -> torch.Tensor:
        """Integer code of the nearest codebook vector for latents shaped (..., D)."""
        return torch.argmin(code_distances(latents, self.codebook.weight), dim=-1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Codebook vectors for integer codes: (...) -> (..., D)."""
        return F.embedding(codes, self.codebook.weight)


@dataclass
class ForwardResult:
    """What one training forward pass yields; the losses are scalars."""

    reconstruction: torch.Tensor
    codes: torch.Tensor
    latents: torch.Tensor  # the encoder's output z_e, channels-last, detached
    recon_loss: torch.Tensor
    codebook_loss: torch.Tensor
    commit_loss: torch.Tensor


class VQVAE(nn.Module):
    """Encoder, quantizer and decoder exactly as printed in the reference design."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c1, c2, c3 = config.channels
        conv = {"kernel_size": 4, "stride": 2, "padding": 1}
        self.encoder = nn.Sequential(
            nn.Conv2d(3, c1, **conv),
            nn.ReLU(),
            nn.Conv2d(c1, c2, **conv),
            nn.ReLU(),
            nn.Conv2d(c2, c3, **conv),
            nn.ReLU(),
        )
        self.before_quantize = nn.Conv2d(c3, config.dim, **conv)
        self.quantizer = Quantizer(config.codes, config.dim)
        self.after_quantize = nn.ConvTranspose2d(config.dim, c3, **conv)
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(c3, c2, **conv),
            nn.Tanh(),
            nn.ConvTranspose2d(c2, c1, **conv),
            nn.Tanh(),
            nn.ConvTranspose2d(c1, 3, **conv),
        )

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Model-scale images N x 3 x H x W -> channels-last latents N x h x w x D."""
        return self.before_quantize(self.encoder(x)).permute(0, 2, 3, 1)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Channels-last latents N x h x w x D -> model-scale images N x 3 x H x W."""
        return self.decoder(self.after_quantize(latents.permute(0, 3, 1, 2)))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Model-scale images -> integer codes N x h x w."""
        return self.quantizer.nearest(self.encode_latents(x))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Integer codes N x h x w -> model-scale images."""
        return self.decode_latents(self.quantizer.lookup(codes))

    def forward(self, x: torch.Tensor) -> ForwardResult:
        z_e = self.encode_latents(x)
        codes = self.quantizer.nearest(z_e.detach())
        e = self.quantizer.lookup(codes)
        # Codebook term moves codes toward encoder outputs; commitment term keeps the encoder
        # near its codes. Each stops the gradient to the other side.
        codebook_loss = F.mse_loss(e, z_e.detach())
        commit_loss = F.mse_loss(z_e, e.detach())
        # Straight-through: the decoder sees e, the encoder gets the decoder's gradient as is.
        z_q = z_e + (e - z_e).detach()
        reconstruction = self.decode_latents(z_q)
        recon_loss = F.mse_loss(reconstruction, x)
        return ForwardResult(reconstruction, codes, z_e.detach(), recon_loss, codebook_loss, commit_loss)

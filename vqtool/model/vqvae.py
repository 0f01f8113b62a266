"""The VQ-VAE of the reference design: encoder -> nearest-code quantizer -> decoder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from vqtool.formats.manifest import QUANTIZE
from vqtool.model.config import ModelConfig
from vqtool.model.face import GraphParts, Permute, Scaling


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


L2_EPSILON = 1e-12


def l2_normalize(vectors: torch.Tensor) -> torch.Tensor:
    """vectors / max(|vectors|, eps) along the last axis, written out so that the exported graph holds exactly
    these operations (ReduceSum, Sqrt, Max, Div: every runtime and TensorRT take them) rather than ReduceL2."""
    norm = (vectors * vectors).sum(dim=-1, keepdim=True).sqrt()
    return vectors / norm.clamp_min(L2_EPSILON)


def nearest_codes(
    latents: torch.Tensor,
    codebook: torch.Tensor,
    code_sq: torch.Tensor | None = None,
    search_prefix: nn.Module | None = None,
    cosine: bool = False,
) -> torch.Tensor:
    """int32 codes of channels-last latents, searched as the exported graphs search: any projection into the
    search space (`search_prefix`), l2-normalisation where `cosine`, the expanded distances, the ArgMin. What the
    encoder graph, a quantising latent decoder and PyTorch's reduced-precision runtime all compute."""
    if search_prefix is not None:
        latents = search_prefix(latents)
    if cosine:
        latents = l2_normalize(latents)
    # int32: what TensorRT's ArgMin/TopK produces natively, and enough for any codebook.
    return torch.argmin(code_distances(latents, codebook, code_sq), dim=-1).to(torch.int32)


def soft_assignment_sums(latents: torch.Tensor, codebook: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sum over the latents (..., d) of their soft assignments softmax(-distance / temperature) to the K codes -> (K,).

    Differentiable in latents and codes, unlike the argmin; what --usage-loss spreads over the codebook.
    """
    flat = latents.reshape(-1, latents.shape[-1])
    return torch.softmax(-code_distances(flat, codebook) / temperature, dim=-1).sum(dim=0)


def rotate_onto(latents: torch.Tensor, codes: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """The rotation trick (Fifty et al., 2024): `codes` in the forward pass, while the gradient reaching them
    goes back to `latents` through the rotation and rescaling that take each latent onto its code (held
    constant), rather than unchanged as with the straight-through estimator: the angle the gradient makes
    with the code becomes the angle it makes with the latent, so latents sharing a code get different
    gradients depending on where they sit relative to it.

    With u = z/|z|, q = e/|e| and w = (u + q)/|u + q|, R = I - 2ww^T + 2qu^T is the rotation with Ru = q,
    so (|e|/|z|) R z = e.
    """
    u = F.normalize(latents.detach(), dim=-1)
    q = F.normalize(codes.detach(), dim=-1)
    w = F.normalize(u + q, dim=-1)
    rotated = latents - 2 * w * (w * latents).sum(-1, keepdim=True) + 2 * q * (u * latents).sum(-1, keepdim=True)
    scale = codes.detach().norm(dim=-1, keepdim=True) / latents.detach().norm(dim=-1, keepdim=True).clamp_min(eps)
    moved = scale * rotated
    result: torch.Tensor = moved + (codes - moved).detach()  # exactly the codes forward, whatever the rounding above
    return result


class Quantizer(nn.Module):
    """Codebook of K vectors; each latent is replaced by its nearest code (L2).

    With `lookup_dim`, latents are projected to that many dimensions before the search and codes are
    projected back after the lookup (factorized codes); with `l2`, latents and codes are l2-normalised
    before the distance, so the nearest code is the one of highest cosine similarity. Neither is part
    of the reference design, so both default off.
    """

    def __init__(self, codes: int, dim: int, lookup_dim: int | None = None, l2: bool = False) -> None:
        super().__init__()
        self.codebook = nn.Embedding(codes, lookup_dim or dim)
        # The article's Embedding uses uniform(-1/K, 1/K), as in the original VQ-VAE code.
        self.codebook.weight.data.uniform_(-1.0 / codes, 1.0 / codes)
        self.project_in = nn.Linear(dim, lookup_dim) if lookup_dim else None
        self.project_out = nn.Linear(lookup_dim, dim) if lookup_dim else None
        self.l2 = l2

    def to_search_space(self, latents: torch.Tensor) -> torch.Tensor:
        """Encoder outputs (..., D) -> the vectors codes are compared with (..., d)."""
        if self.project_in is not None:
            latents = self.project_in(latents)
        return l2_normalize(latents) if self.l2 else latents

    def search_codebook(self) -> torch.Tensor:
        """The K x d vectors latents are compared with (normalised with l2)."""
        weight = self.codebook.weight
        return l2_normalize(weight) if self.l2 else weight

    def from_search_space(self, vectors: torch.Tensor) -> torch.Tensor:
        """Looked-up codes (..., d) -> what the decoder takes (..., D)."""
        return self.project_out(vectors) if self.project_out is not None else vectors

    def nearest(self, latents: torch.Tensor) -> torch.Tensor:
        """Integer code of the nearest codebook vector for search-space latents shaped (..., d)."""
        return torch.argmin(code_distances(latents, self.search_codebook()), dim=-1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Codebook vectors for integer codes, in the search space: (...) -> (..., d)."""
        return F.embedding(codes, self.search_codebook())


class ResidualBlock(nn.Module):
    """x + Conv1x1(ReLU(Conv3x3(ReLU(x)))), as in van den Oord et al. (2017), at the latent resolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = x + self.body(x)
        return result


def _down(fan_in: int, fan_out: int, stride: int) -> nn.Conv2d:
    """The reference design's 4x4 stride-2 convolution, or a 3x3 stride-1 one where no halving is wanted."""
    if stride == 2:
        return nn.Conv2d(fan_in, fan_out, kernel_size=4, stride=2, padding=1)
    return nn.Conv2d(fan_in, fan_out, kernel_size=3, stride=1, padding=1)


def _up(fan_in: int, fan_out: int, stride: int) -> nn.Module:
    """The mirror of _down: a 4x4 stride-2 transposed convolution, or a 3x3 stride-1 convolution."""
    if stride == 2:
        return nn.ConvTranspose2d(fan_in, fan_out, kernel_size=4, stride=2, padding=1)
    return nn.Conv2d(fan_in, fan_out, kernel_size=3, stride=1, padding=1)


@dataclass
class ForwardResult:
    """What one training forward pass yields; the losses are scalars."""

    reconstruction: torch.Tensor
    codes: torch.Tensor
    latents: torch.Tensor  # the encoder's output z_e, channels-last, detached
    recon_loss: torch.Tensor
    codebook_loss: torch.Tensor
    commit_loss: torch.Tensor
    assignment_sums: torch.Tensor | None = None  # soft_assignment_sums, when forward was given a usage temperature


class VQVAE(nn.Module):
    """Encoder, quantizer and decoder; with the default ModelConfig exactly as printed in the reference design."""

    trained_by_vqtool = True  # the face's (vqtool.model.face.TokenizerModel)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        widths, strides = config.channels, config.strides
        encoder: list[nn.Module] = []
        for fan_in, fan_out, stride in zip((3, *widths), widths, strides, strict=False):
            encoder += [_down(fan_in, fan_out, stride), nn.ReLU()]
        encoder += [ResidualBlock(widths[-1]) for _ in range(config.res_blocks)]
        self.encoder = nn.Sequential(*encoder)
        self.before_quantize = _down(widths[-1], config.dim, strides[-1])
        self.quantizer = Quantizer(config.codes, config.dim, config.lookup_dim, config.l2_codes)
        self.after_quantize = _up(config.dim, widths[-1], strides[-1])
        decoder: list[nn.Module] = [ResidualBlock(widths[-1]) for _ in range(config.res_blocks)]
        outputs = (*widths[:-1][::-1], 3)
        for index, (fan_in, fan_out) in enumerate(zip(widths[::-1], outputs, strict=True)):
            decoder.append(_up(fan_in, fan_out, strides[len(widths) - 1 - index]))
            if fan_out != 3:
                decoder.append(nn.Tanh())
        self.decoder = nn.Sequential(*decoder)

    def model_input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 N x H x W x 3 -> the model's input scale (the same face an imported model has)."""
        return images_to_input(images)

    def graph_parts(self) -> GraphParts:
        """The exported graphs' pieces: the projection and normalisation belong to the quantizer (its FP32
        island); the transposed convolutions come last in the decoder's body, in its order."""
        quantizer = self.quantizer
        return GraphParts(
            input_scaling=Scaling(images_to_input),
            encoder_body=nn.Sequential(self.encoder, self.before_quantize, Permute(0, 2, 3, 1)),
            search_prefix=quantizer.project_in,
            cosine=quantizer.l2,
            search_codebook=quantizer.search_codebook(),
            decode_codebook=quantizer.search_codebook(),
            lookup_suffix=quantizer.project_out,
            decoder_body=nn.Sequential(Permute(0, 3, 1, 2), self.after_quantize, self.decoder),
            output_scaling=Scaling(output_to_images),
            dynamic_sides=self.config.downsample,
        )

    def model_output(self, output: torch.Tensor) -> torch.Tensor:
        return output_to_images(output)

    @property
    def has_decoder(self) -> bool:
        return True

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Model-scale images N x 3 x H x W -> channels-last latents in the search space, N x h x w x d."""
        return self.quantizer.to_search_space(self.before_quantize(self.encoder(x)).permute(0, 2, 3, 1))

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Channels-last search-space latents N x h x w x d -> model-scale images N x 3 x H x W."""
        latents = self.quantizer.from_search_space(latents)
        images: torch.Tensor = self.decoder(self.after_quantize(latents.permute(0, 3, 1, 2)))
        return images

    @property
    def pipeline_latent_decode(self) -> str:
        return QUANTIZE

    def pipeline_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Model-scale images -> the latents before any projection or quantisation, N x D x h x w."""
        latents: torch.Tensor = self.before_quantize(self.encoder(x))
        return latents

    def decode_pipeline_latents(self, latents: torch.Tensor, quantize: bool) -> torch.Tensor:
        """pipeline_latents -> model-scale images: through their nearest codes, or as they are."""
        if quantize:
            return self.decode(self.quantizer.nearest(self.quantizer.to_search_space(latents.permute(0, 2, 3, 1))))
        images: torch.Tensor = self.decoder(self.after_quantize(latents))
        return images

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Model-scale images -> integer codes N x h x w."""
        return self.quantizer.nearest(self.encode_latents(x))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Integer codes N x h x w -> model-scale images."""
        return self.decode_latents(self.quantizer.lookup(codes))

    def forward(
        self, x: torch.Tensor, rotation_trick: bool = False, usage_temperature: float | None = None
    ) -> ForwardResult:
        z_e = self.encode_latents(x)
        codes = self.quantizer.nearest(z_e.detach())
        e = self.quantizer.lookup(codes)
        # Codebook term moves codes toward encoder outputs; commitment term keeps the encoder
        # near its codes. Each stops the gradient to the other side.
        codebook_loss = F.mse_loss(e, z_e.detach())
        commit_loss = F.mse_loss(z_e, e.detach())
        # The decoder sees e. Straight-through (the article's): the encoder gets the decoder's gradient as is;
        # with the rotation trick, rotated as described in rotate_onto.
        z_q = rotate_onto(z_e, e) if rotation_trick else z_e + (e - z_e).detach()
        reconstruction = self.decode_latents(z_q)
        recon_loss = F.mse_loss(reconstruction, x)
        sums = (
            soft_assignment_sums(z_e, self.quantizer.search_codebook(), usage_temperature)
            if usage_temperature
            else None
        )
        return ForwardResult(reconstruction, codes, z_e.detach(), recon_loss, codebook_loss, commit_loss, sums)


@torch.no_grad()
def encoder_macs(model: Any) -> int:
    """Multiply-adds of encoding one image of the model's size: each convolution and projection as it runs
    (from its output's shape), then the distances to all K codes. Any model with `encode_latents` and a config
    holding `image_size` and `codes` (vqtool's own, or an imported one)."""
    macs = 0

    def count(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(module, nn.Conv2d):
            fan_in = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        else:
            fan_in = module.in_features  # type: ignore[assignment]
        macs += output.numel() * fan_in

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    try:
        size = model.config.image_size
        latents = model.encode_latents(torch.zeros(1, 3, size, size))
    finally:
        for hook in hooks:
            hook.remove()
    return int(macs + latents[..., 0].numel() * model.config.codes * latents.shape[-1])

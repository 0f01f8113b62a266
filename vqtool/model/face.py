"""The one face every tokenizer shows export, parity, the torch runtime and the benchmarks: vqtool's own VQ-VAE and
each imported family alike, so that none of them asks which kind of model it holds."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn


class Scaling(nn.Module):
    """A pixel conversion as a module (no weights of its own but the buffers it is given): uint8 images to the
    model's input scale, or its output back to uint8 images."""

    def __init__(self, convert: Callable[..., torch.Tensor], **buffers: torch.Tensor) -> None:
        super().__init__()
        self.convert, self.names = convert, tuple(buffers)
        for name, value in buffers.items():
            self.register_buffer(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convert(x, *(getattr(self, name) for name in self.names))


class Permute(nn.Module):
    """Channels between first and last, as the graph's halves hand latents to each other."""

    def __init__(self, *order: int) -> None:
        super().__init__()
        self.order = order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.order)


@dataclass(frozen=True)
class GraphParts:
    """What a tokenizer's two exported graphs are made of, in their order.

    Encoder: `input_scaling` (uint8 N x H x W x 3 -> model-scale N x 3 x H x W, FP32), `encoder_body` (-> latents
    N x h x w x D, at the graph's precision), `search_prefix` (-> the search space, at the quantizer's precision),
    then l2-normalisation where `cosine`, and the nearest of `search_codebook`'s codes. Decoder: the codes'
    vectors in `decode_codebook`, `lookup_suffix` (at the quantizer's precision), `decoder_body` (N x h x w x D ->
    model-scale images, at the graph's precision; None: the model has no decoder), `output_scaling` (-> uint8).
    `dynamic_sides`: images may have any sides that are multiples of it (None: the model's own size only)."""

    input_scaling: nn.Module
    encoder_body: nn.Module
    search_prefix: nn.Module | None
    cosine: bool
    search_codebook: torch.Tensor
    decode_codebook: torch.Tensor
    lookup_suffix: nn.Module | None
    decoder_body: nn.Module | None
    output_scaling: nn.Module
    dynamic_sides: int | None


class Quantizing(Protocol):
    """A tokenizer's nearest-code search, over search-space latents."""

    def search_codebook(self) -> torch.Tensor: ...

    def nearest(self, latents: torch.Tensor) -> torch.Tensor: ...


class TokenizerModel(Protocol):
    """What every caller outside the model package sees of a tokenizer, vqtool's own or imported."""

    config: Any  # ModelConfig or ImportedConfig: image_size, grid, codes, downsample, to_dict()

    # Read-only, so that each model's own quantizer class satisfies it (a settable member must be exactly Quantizing).
    @property
    def quantizer(self) -> Quantizing: ...

    # Whether vqtool trained it, on data the checkpoint names (parity and INT8 calibration then use that data's
    # held-out crops); an imported model is checked and calibrated on whole photographs at its own size instead.
    trained_by_vqtool: bool

    @property
    def has_decoder(self) -> bool: ...

    def model_input(self, images: torch.Tensor) -> torch.Tensor: ...

    def model_output(self, output: torch.Tensor) -> torch.Tensor: ...

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor: ...

    def encode(self, x: torch.Tensor) -> torch.Tensor: ...

    def decode(self, codes: torch.Tensor) -> torch.Tensor: ...

    def graph_parts(self) -> GraphParts: ...

    # The latents diffusion pipelines hand over (export --latents): N x D x h x w before quantisation, and how the
    # model's pipeline decodes them (QUANTIZE or DIRECT, vqtool.formats.manifest).
    @property
    def pipeline_latent_decode(self) -> str: ...

    def pipeline_latents(self, x: torch.Tensor) -> torch.Tensor: ...

    def decode_pipeline_latents(self, latents: torch.Tensor, quantize: bool) -> torch.Tensor: ...

    # nn.Module's own, which export, parity and checkpoints use
    def eval(self) -> Any: ...

    def to(self, *args: Any, **kwargs: Any) -> Any: ...

    def modules(self) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> Any: ...

"""Tokenizers trained elsewhere, run through their own library's classes: diffusers' `VQModel` (latent diffusion's
VQ-f4/f8, Kandinsky's MoVQ, aMUSEd's VQGAN) and transformers' `JanusVQVAE` (LlamaGen's VQ-16 as Janus ships it).

`ImportedVQ` gives such a model the face vqtool's export, parity and runtimes use for its own VQ-VAE: latents in
the space codes are searched in (`encode_latents`), a quantizer with `nearest` and `search_codebook`, `encode`
and `decode` by the library's own code paths, and the two halves the exported graphs are made of
(`encoder_body`: model-scale images -> search-space latents, `decoder_body`: looked-up codes -> images).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from vqtool.errors import VqtoolError, missing_extra
from vqtool.model.vqvae import code_distances, l2_normalize

IMPORTED = "imported"  # the `family` of an imported model's configuration, as checkpoints and manifests store it
QUANTIZERS = ("library", "original")


@dataclass(frozen=True)
class ImportedConfig:
    """What a checkpoint stores of an imported model: the library, class and version it came from, the library's
    own configuration, the image size it runs at, and which quantizer picks its codes."""

    library: str
    class_name: str
    library_version: str
    config: dict[str, Any]
    image_size: int
    downsample: int
    codes: int
    # "library": the library's own nearest-code search; "original": the model's original design, where it differs.
    quantizer: str = "library"
    family: str = field(default=IMPORTED)

    @property
    def grid(self) -> int:
        return self.image_size // self.downsample

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ImportedConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


class _LibraryQuantizer:
    """The nearest-code search as the library (or the original design) does it, over search-space latents."""

    def __init__(self, owner: ImportedVQ) -> None:
        self._owner = owner

    def search_codebook(self) -> torch.Tensor:
        return self._owner.search_codebook()

    def nearest(self, latents: torch.Tensor) -> torch.Tensor:
        return self._owner.nearest(latents)


class ImportedVQ(nn.Module):
    """A library's VQ model behind the interface vqtool's own model has; subclasses know one library class."""

    library = ""
    class_name = ""
    library_model: Any  # the library's own model class, untyped to mypy

    def __init__(self, config: ImportedConfig, library_model: nn.Module) -> None:
        super().__init__()
        self.config = config
        self.library_model = library_model.eval()
        self.quantizer = _LibraryQuantizer(self)

    # ---- what each family says about itself ----
    def embedding(self) -> torch.Tensor:
        """The K x D codebook as the library stores it."""
        raise NotImplementedError

    def encoder_body(self) -> nn.Module:
        """Model-scale images N x 3 x H x W -> latents N x h x w x D, before any normalisation of the search."""
        raise NotImplementedError

    def decoder_body(self) -> nn.Module:
        """Looked-up codes N x h x w x D -> model-scale images N x 3 x H x W."""
        raise NotImplementedError

    def library_codes(self, latents: torch.Tensor) -> torch.Tensor:
        """The library's own quantizer over encoder_body's latents (N x h x w x D) -> codes N x h x w."""
        raise NotImplementedError

    def decode_codebook(self) -> torch.Tensor:
        """The vectors the library's decode looks codes up in (K x D)."""
        return self.embedding()

    @property
    def cosine(self) -> bool:
        """Whether codes are searched by cosine similarity (l2-normalised latents and codes)."""
        return False

    # ---- the interface export, parity and the torch backend use ----
    def search_codebook(self) -> torch.Tensor:
        book = self.embedding()
        return l2_normalize(book) if self.cosine else book

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        latents = self.encoder_body()(x)
        return l2_normalize(latents) if self.cosine else latents

    def nearest(self, latents: torch.Tensor) -> torch.Tensor:
        if self.config.quantizer == "library":
            return self.library_codes(latents)
        return torch.argmin(code_distances(latents, self.search_codebook()), dim=-1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.nearest(self.encode_latents(x))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        vectors = nn.functional.embedding(codes, self.decode_codebook())
        result: torch.Tensor = self.decoder_body()(vectors)
        return result


# ---- the halves both libraries' models share ---------------------------------------------------------------------


class _EncoderThenQuantConv(nn.Module):
    """The encoder half both libraries share: `encoder`, then the 1x1 `quant_conv` into the codes' dimension."""

    def __init__(self, vq: Any) -> None:
        super().__init__()
        self.encoder, self.quant_conv = vq.encoder, vq.quant_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.quant_conv(self.encoder(x)).permute(0, 2, 3, 1)
        return result


class _PostQuantConvThenDecoder(nn.Module):
    """The decoder half both libraries share: the 1x1 `post_quant_conv`, then `decoder`; with `spatial` (MoVQ's
    spatial norm), the decoder's norms are conditioned on the looked-up codes themselves."""

    def __init__(self, vq: Any, spatial: bool = False) -> None:
        super().__init__()
        self.post_quant_conv, self.decoder, self.spatial = vq.post_quant_conv, vq.decoder, spatial

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        quant = vectors.permute(0, 3, 1, 2)
        conditions = (quant,) if self.spatial else ()
        result: torch.Tensor = self.decoder(self.post_quant_conv(quant), *conditions)
        return result


# ---- diffusers: VQModel ------------------------------------------------------------------------------------------


class DiffusersVQ(ImportedVQ):
    """diffusers' VQModel: encode(x).latents, then its VectorQuantizer (argmin of torch.cdist to the codebook)."""

    library, class_name = "diffusers", "VQModel"

    def embedding(self) -> torch.Tensor:
        result: torch.Tensor = self.library_model.quantize.embedding.weight
        return result

    def encoder_body(self) -> nn.Module:
        return _EncoderThenQuantConv(self.library_model)

    def decoder_body(self) -> nn.Module:
        return _PostQuantConvThenDecoder(self.library_model, self.library_model.config.norm_type == "spatial")

    def library_codes(self, latents: torch.Tensor) -> torch.Tensor:
        quantize = self.library_model.quantize
        indices = quantize(latents.permute(0, 3, 1, 2))[2][2]
        result: torch.Tensor = indices.reshape(latents.shape[:3])
        return result

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """The library's decode from indices: the codebook entries, then decode without quantizing again."""
        vq = self.library_model
        shape = (*codes.shape, vq.quantize.vq_embed_dim)
        if vq.config.lookup_from_codebook:  # aMUSEd: decode takes the indices and looks them up itself
            looked_up: torch.Tensor = vq.decode(codes.reshape(-1), force_not_quantize=True, shape=shape).sample
            return looked_up
        quant = vq.quantize.get_codebook_entry(codes.reshape(-1), shape)
        images: torch.Tensor = vq.decode(quant, force_not_quantize=True).sample
        return images


# ---- transformers: JanusVQVAE ------------------------------------------------------------------------------------


class JanusVQ(ImportedVQ):
    """transformers' JanusVQVAE (LlamaGen's VQ-16 design). Its quantizer's forward takes the argmin of |z - e|^2 on
    raw vectors, while its decode looks up l2-normalised codes; the original design (LlamaGen's
    codebook_l2_norm) normalises both latents and codes before the search: quantizer="original"."""

    library, class_name = "transformers", "JanusVQVAE"

    def embedding(self) -> torch.Tensor:
        result: torch.Tensor = self.library_model.quantize.embedding.weight
        return result

    def decode_codebook(self) -> torch.Tensor:
        return l2_normalize(self.embedding())  # as get_codebook_entry does

    @property
    def cosine(self) -> bool:
        return self.config.quantizer == "original"

    def encoder_body(self) -> nn.Module:
        return _EncoderThenQuantConv(self.library_model)

    def decoder_body(self) -> nn.Module:
        return _PostQuantConvThenDecoder(self.library_model)

    def library_codes(self, latents: torch.Tensor) -> torch.Tensor:
        indices = self.library_model.quantize(latents.permute(0, 3, 1, 2))[2]
        result: torch.Tensor = indices.reshape(latents.shape[:3])
        return result

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """The library's decode from image tokens (it checks their count against the model's patches)."""
        result: torch.Tensor = self.library_model.decode(codes.reshape(len(codes), -1))
        return result


FAMILIES: dict[tuple[str, str], type[ImportedVQ]] = {
    (DiffusersVQ.library, DiffusersVQ.class_name): DiffusersVQ,
    (JanusVQ.library, JanusVQ.class_name): JanusVQ,
}


def library_class(library: str, class_name: str) -> Any:
    """The library's model class; the one sentence naming the extra where the library is not installed."""
    try:
        if library == "diffusers":
            import diffusers

            return getattr(diffusers, class_name)
        if library == "transformers":
            import transformers

            return getattr(transformers, class_name)
    except ModuleNotFoundError:
        raise missing_extra(f"a {class_name} from {library}", library, "import") from None
    raise VqtoolError(f"vqtool cannot run a {class_name} from {library}")


def build_imported(config: ImportedConfig) -> ImportedVQ:
    """The library's model, built from its stored configuration (weights not loaded), behind ImportedVQ."""
    family = FAMILIES.get((config.library, config.class_name))
    if family is None:
        known = ", ".join(f"{lib} {name}" for lib, name in FAMILIES)
        raise VqtoolError(f"vqtool imports {known}; not a {config.class_name} from {config.library}")
    cls = library_class(config.library, config.class_name)
    if config.library == "diffusers":
        library_model = cls.from_config(config.config)
    else:
        library_model = cls(cls.config_class.from_dict(config.config))
    return family(config, library_model)

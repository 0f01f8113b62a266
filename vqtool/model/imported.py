"""Tokenizers trained elsewhere, run through their own library's classes: diffusers' `VQModel` (latent diffusion's
VQ-f4/f8, Kandinsky's MoVQ, aMUSEd's VQGAN), transformers' `JanusVQVAE` (LlamaGen's VQ-16 as Janus ships it),
`Emu3VQVAE` (its image path) and `ChameleonVQVAE` (an encoder only: transformers has no decoder for it).

`ImportedVQ` gives such a model the face vqtool's export, parity and runtimes use for its own VQ-VAE: latents in
the space codes are searched in (`encode_latents`), a quantizer with `nearest` and `search_codebook`, `encode`
and `decode` by the library's own code paths, and the two halves the exported graphs are made of
(`encoder_body`: model-scale images -> search-space latents, `decoder_body`: looked-up codes -> images).
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vqtool.errors import VqtoolError, missing_extra
from vqtool.formats.manifest import DIRECT, QUANTIZE
from vqtool.model.config import QUANTIZERS
from vqtool.model.face import GraphParts, Scaling
from vqtool.model.vqvae import code_distances, l2_normalize

IMPORTED = "imported"  # the `family` of an imported model's configuration, as checkpoints and manifests store it
# uint8 pixels -> the model's input: x = pixel * gain + bias per channel; [-1, 1] unless the model says otherwise.
SIGNED_UNIT: tuple[tuple[float, ...], tuple[float, ...]] = ((1 / 127.5,) * 3, (-1.0,) * 3)


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
    # The model's input scaling, from its image processor's rescale factor, mean and std (see pixel_scaling).
    pixel_gain: tuple[float, ...] = SIGNED_UNIT[0]
    pixel_bias: tuple[float, ...] = SIGNED_UNIT[1]
    decoder: bool = True  # False where the library implements only the encoder; the export then has no decoder
    family: str = field(default=IMPORTED)
    # taming's index remapping (its YAML's `remap`): how many codebook rows are in use (the quantizer's `used`
    # buffer, stored with the weights); code ids are positions in that list. None: no remapping.
    used_codes: int | None = None

    @property
    def grid(self) -> int:
        return self.image_size // self.downsample

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ImportedConfig:
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {k: (tuple(v) if k.startswith("pixel_") else v) for k, v in raw.items() if k in known}
        return cls(**values)


def pixel_scaling(rescale: float, mean: Any, std: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(gain, bias) per channel of an image processor's `(pixel * rescale - mean) / std`."""
    means = [float(mean)] * 3 if isinstance(mean, int | float) else [float(m) for m in mean]
    stds = [float(std)] * 3 if isinstance(std, int | float) else [float(s) for s in std]
    return tuple(rescale / s for s in stds), tuple(-m / s for m, s in zip(means, stds, strict=True))


def _channel_view(values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=like.device).reshape(1, 3, 1, 1)


def pixels_to_input(images: torch.Tensor, gain: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """uint8 N x H x W x 3 -> float N x 3 x H x W at the model's input scale (gain, bias: 1 x 3 x 1 x 1)."""
    return images.to(torch.float32).permute(0, 3, 1, 2) * gain + bias


def output_to_pixels(output: torch.Tensor, gain: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The inverse of pixels_to_input, rounded to the nearest grey level: float N x 3 x H x W -> uint8 NHWC."""
    pixels = ((output.to(torch.float32) - bias) / gain).clamp(0.0, 255.0).round()
    return pixels.permute(0, 2, 3, 1).to(torch.uint8)


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
    config_type = ""  # what config.json names it by: diffusers' `_class_name`, transformers' `model_type`
    scaling = SIGNED_UNIT  # the input scaling where the source holds no image processor's settings
    implements_decoder = True  # whether the library can decode codes
    quantizers: tuple[str, ...] = ("library",)  # "original" too where the library's search differs from the design
    library_model: Any  # the library's own model class, untyped to mypy
    trained_by_vqtool = False  # the face's: checked and calibrated on photographs at its size

    def __init__(self, config: ImportedConfig, library_model: nn.Module) -> None:
        super().__init__()
        self.config = config
        self.library_model = library_model.eval()
        self.quantizer = _LibraryQuantizer(self)

    # ---- what each family says about itself ----
    def embedding(self) -> torch.Tensor:
        """The K x D codebook the code ids index: as the library stores it (under taming's remap, its rows in use,
        in the order of the quantizer's `used` list)."""
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

    def library_encode(self, x: torch.Tensor) -> torch.Tensor:
        """The library's own encode, end to end, as its users call it (model-scale images -> its codes): what
        benchmarks time vqtool's runtimes against."""
        result: torch.Tensor = self.library_model.encode(x).image_tokens
        return result

    @classmethod
    def native_size(cls, config: dict[str, Any]) -> int:
        """The image side the model was made for, from the library's configuration."""
        downsample = 2 ** (len(config.get("channel_multiplier", (1, 1, 2, 2, 4))) - 1)
        return int(config.get("resolution") or int(config.get("num_patches", 32)) * downsample)

    @property
    def has_decoder(self) -> bool:
        """Whether the library can turn codes back into images (ChameleonVQVAE cannot)."""
        return self.config.decoder

    @property
    def cosine(self) -> bool:
        """Whether codes are searched by cosine similarity (l2-normalised latents and codes)."""
        return False

    # ---- the interface export, parity and the torch backend use ----
    def model_input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 N x H x W x 3 -> the model's input scale and channel order."""
        gain, bias = _channel_view(self.config.pixel_gain, images), _channel_view(self.config.pixel_bias, images)
        return pixels_to_input(images, gain, bias)

    def model_output(self, output: torch.Tensor) -> torch.Tensor:
        """The decoder's output -> uint8 N x H x W x 3."""
        config = self.config
        gain, bias = _channel_view(config.pixel_gain, output), _channel_view(config.pixel_bias, output)
        return output_to_pixels(output, gain, bias)

    def search_codebook(self) -> torch.Tensor:
        book = self.embedding()
        return l2_normalize(book) if self.cosine else book

    def graph_parts(self) -> GraphParts:
        """The exported graphs' pieces: the library's halves at the graph's precision, the search in FP32."""
        gain = torch.tensor(self.config.pixel_gain, dtype=torch.float32).reshape(1, 3, 1, 1)
        bias = torch.tensor(self.config.pixel_bias, dtype=torch.float32).reshape(1, 3, 1, 1)
        return GraphParts(
            input_scaling=Scaling(pixels_to_input, gain=gain, bias=bias),
            encoder_body=self.encoder_body(),
            search_prefix=None,
            cosine=self.cosine,
            search_codebook=self.search_codebook().detach().float(),
            decode_codebook=self.decode_codebook(),
            lookup_suffix=None,
            decoder_body=self.decoder_body() if self.has_decoder else None,
            output_scaling=Scaling(output_to_pixels, gain=gain.clone(), bias=bias.clone()),
            dynamic_sides=None,
        )

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_latents_from(self.encoder_body()(x))

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

    @property
    def pipeline_latent_decode(self) -> str:
        """How the model's pipelines decode latents: quantising them first, unless a family says otherwise."""
        return QUANTIZE

    def pipeline_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Model-scale images -> the latents before quantisation, N x D x h x w (the library's layout)."""
        return self.encoder_body()(x).permute(0, 3, 1, 2)

    def decode_pipeline_latents(self, latents: torch.Tensor, quantize: bool) -> torch.Tensor:
        """Latents N x D x h x w -> model-scale images: through their nearest codes, or as they are."""
        if quantize:
            return self.decode(self.nearest(self.encode_latents_from(latents.permute(0, 2, 3, 1))))
        result: torch.Tensor = self.decoder_body()(latents.permute(0, 2, 3, 1))
        return result

    def encode_latents_from(self, latents: torch.Tensor) -> torch.Tensor:
        """encoder_body's latents -> the space codes are searched in."""
        return l2_normalize(latents) if self.cosine else latents


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


def remap_codes(quantize: Any, used_codes: int) -> None:
    """Switch on diffusers' VectorQuantizer's own index remapping, which VQModel builds switched off (remap=None):
    the `used` buffer (filled when the weights load) lists the codebook rows in use, and code ids are positions in
    it, as taming's VectorQuantizer2 gives them. Its unknown_index is taming's, "random"; vqtool never searches
    the rows not in use (DiffusersVQ.library_codes)."""
    quantize.remap = "used"  # diffusers asks only whether it is set; the table is the buffer
    quantize.register_buffer("used", torch.zeros(used_codes, dtype=torch.long))
    quantize.re_embed, quantize.unknown_index = used_codes, "random"


class DiffusersVQ(ImportedVQ):
    """diffusers' VQModel: encode(x).latents, then its VectorQuantizer (argmin of torch.cdist to the codebook).

    Under taming's remap (`used_codes`), the codebook is the rows in use: where taming draws a random id for a
    latent whose nearest row is not in use, vqtool gives the nearest row in use, the one deterministic answer."""

    library, class_name, config_type = "diffusers", "VQModel", "VQModel"

    def __init__(self, config: ImportedConfig, library_model: nn.Module) -> None:
        super().__init__(config, library_model)
        quantize = self.library_model.quantize
        if config.used_codes is not None and getattr(quantize, "remap", None) is None:
            remap_codes(quantize, config.used_codes)

    @classmethod
    def native_size(cls, config: dict[str, Any]) -> int:
        return int(config.get("sample_size") or 256)

    @property
    def remapped(self) -> bool:
        return getattr(self.library_model.quantize, "remap", None) is not None

    def embedding(self) -> torch.Tensor:
        quantize = self.library_model.quantize
        result: torch.Tensor = quantize.embedding.weight
        return result[quantize.used.long()] if self.remapped else result

    def encoder_body(self) -> nn.Module:
        return _EncoderThenQuantConv(self.library_model)

    def decoder_body(self) -> nn.Module:
        return _PostQuantConvThenDecoder(self.library_model, self.library_model.config.norm_type == "spatial")

    def outside_rows_in_use(self, latents: torch.Tensor) -> int:
        """How many of these latents (N x h x w x D) have their nearest codebook row among the rows a remap leaves
        out: those taming gives a random id, and vqtool the nearest row in use."""
        quantize = self.library_model.quantize
        in_use = torch.zeros(quantize.n_e, dtype=torch.bool)
        in_use[quantize.used.long()] = True
        nearest = torch.argmin(code_distances(latents, quantize.embedding.weight), dim=-1)
        return int((~in_use[nearest]).sum())

    def library_codes(self, latents: torch.Tensor) -> torch.Tensor:
        if self.remapped:  # the nearest row in use, where the library would draw a random id for some latents
            return torch.argmin(code_distances(latents, self.embedding()), dim=-1)
        quantize = self.library_model.quantize
        indices = quantize(latents.permute(0, 3, 1, 2))[2][2]
        result: torch.Tensor = indices.reshape(latents.shape[:3])
        return result

    def library_encode(self, x: torch.Tensor) -> torch.Tensor:
        vq = self.library_model
        result: torch.Tensor = vq.quantize(vq.encode(x).latents)[2][2]
        return result

    @property
    def pipeline_latent_decode(self) -> str:
        """Kandinsky decodes MoVQ's (spatial-norm) latents as they are (movq.decode(force_not_quantize=True)); latent
        diffusion's pipelines hand vqvae.decode latents it quantises."""
        return DIRECT if self.library_model.config.norm_type == "spatial" else QUANTIZE

    def pipeline_latents(self, x: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.library_model.encode(x).latents
        return result

    def decode_pipeline_latents(self, latents: torch.Tensor, quantize: bool) -> torch.Tensor:
        """The library's own decode of latents, as the pipelines call it (aMUSEd's decode takes indices only: its
        latents go through the common path)."""
        if self.library_model.config.lookup_from_codebook:
            return super().decode_pipeline_latents(latents, quantize)
        result: torch.Tensor = self.library_model.decode(latents, force_not_quantize=not quantize).sample
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

    library, class_name, config_type = "transformers", "JanusVQVAE", "janus_vqgan"
    quantizers = QUANTIZERS

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


# ---- transformers: Emu3VQVAE -------------------------------------------------------------------------------------


class _Emu3Encoder(nn.Module):
    """Emu3VQVAE's encoder on images: the library repeats an image into `temporal_downsample_factor` frames and
    encodes each; the frames are equal and its spatial layers see one frame at a time, so the spatial part runs
    once and its output is repeated before the temporal layers. Then quant_conv, as Emu3VQVAE.encode does."""

    def __init__(self, vq: Any) -> None:
        super().__init__()
        self.encoder, self.quant_conv = vq.encoder, vq.quant_conv
        self.frames = int(vq.config.temporal_downsample_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        hidden = enc.middle_block(enc.down_block(enc.conv_in(x)))
        hidden = enc.norm_out(hidden)
        hidden = enc.conv_out(hidden * torch.sigmoid(hidden))
        hidden = hidden.unsqueeze(2).repeat(1, 1, self.frames, 1, 1)  # N x C x T x h x w
        for conv in enc.time_conv:
            hidden = conv(hidden)
            hidden = hidden * torch.sigmoid(hidden)
        for layer in enc.time_res_stack:
            hidden = layer(hidden)
        result: torch.Tensor = self.quant_conv(hidden)[:, :, 0].permute(0, 2, 3, 1)  # one frame remains
        return result


class _Emu3Decoder(nn.Module):
    """Emu3VQVAE's decoder on one image: the temporal layers turn the codes into `temporal_downsample_factor`
    frames and the library decodes them all to keep the first; this decodes only the first."""

    def __init__(self, vq: Any) -> None:
        super().__init__()
        self.post_quant_conv, self.decoder = vq.post_quant_conv, vq.decoder

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        quant = vectors.permute(0, 3, 1, 2).unsqueeze(2)  # N x D x 1 x h x w
        dec = self.decoder
        both = torch.cat((self.post_quant_conv(quant), quant), dim=0)
        for layer in dec.time_res_stack:
            both = layer(both)
        for layer in dec.time_conv:
            both = layer(both)
            both = both * torch.sigmoid(both)
        # Sliced, not chunked: torch.export reads chunk's rounding as a guard that fixes the batch.
        first = both[:, :, 0]
        count = vectors.shape[0]  # not len(): that turns the symbolic batch into a constant
        hidden, quant_states = first[:count], first[count:]
        hidden = dec.up_block(dec.middle_block(dec.conv_in(hidden), quant_states), quant_states)
        hidden = dec.norm_out(hidden, quant_states)
        result: torch.Tensor = dec.conv_out(hidden * torch.sigmoid(hidden))
        return result


class Emu3VQ(ImportedVQ):
    """transformers' Emu3VQVAE on images: encode(x, image_sizes).image_tokens, decode(codes)."""

    library, class_name, config_type = "transformers", "Emu3VQVAE", "emu3_vqgan"

    @classmethod
    def native_size(cls, config: dict[str, Any]) -> int:
        return 512  # Emu3's image processor works around 512 x 512 (its min_pixels)

    def embedding(self) -> torch.Tensor:
        result: torch.Tensor = self.library_model.quantize.embedding.weight
        return result

    def encoder_body(self) -> nn.Module:
        return _Emu3Encoder(self.library_model)

    def decoder_body(self) -> nn.Module:
        return _Emu3Decoder(self.library_model)

    def library_codes(self, latents: torch.Tensor) -> torch.Tensor:
        codes: torch.Tensor = self.library_model.quantize(latents.permute(0, 3, 1, 2).unsqueeze(1))
        return codes[:, 0]

    def library_encode(self, x: torch.Tensor) -> torch.Tensor:
        sizes = torch.tensor([[self.config.image_size] * 2] * len(x))
        result: torch.Tensor = self.library_model.encode(x, image_sizes=sizes).image_tokens
        return result

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.library_model.decode(codes)
        return result


# ---- transformers: ChameleonVQVAE --------------------------------------------------------------------------------


class ChameleonVQ(ImportedVQ):
    """transformers' ChameleonVQVAE: encode(x).image_tokens. transformers has no decoder for it: it is exported
    as an encoder only."""

    library, class_name, config_type = "transformers", "ChameleonVQVAE", "chameleon_vqgan"
    scaling = pixel_scaling(0.0078, 1.0, 1.0)  # ChameleonImageProcessor's rescale, mean and std

    implements_decoder = False

    def embedding(self) -> torch.Tensor:
        result: torch.Tensor = self.library_model.quantize.embedding.weight
        return result

    def encoder_body(self) -> nn.Module:
        return _EncoderThenQuantConv(self.library_model)

    def library_codes(self, latents: torch.Tensor) -> torch.Tensor:
        indices = self.library_model.quantize(latents.permute(0, 3, 1, 2))[2]
        result: torch.Tensor = indices.reshape(latents.shape[:3])
        return result

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        raise VqtoolError(NO_DECODER.format(name=self.class_name))


NO_DECODER = "{name} has no decoder (transformers implements only its encoder): codes cannot be decoded"

FAMILIES: dict[tuple[str, str], type[ImportedVQ]] = {
    (family.library, family.class_name): family for family in (DiffusersVQ, JanusVQ, Emu3VQ, ChameleonVQ)
}


class LibraryAdapter:
    """How vqtool reaches one library's models: the library itself, a model loaded from a folder in the library's
    own layout (from_pretrained; nothing is downloaded, no code from the folder runs), and a model built from a
    stored configuration (its weights then loaded from the checkpoint)."""

    name = ""
    # Given to from_pretrained beside the folder.
    load_options: tuple[tuple[str, bool], ...] = ()

    def module(self, class_name: str) -> Any:
        try:
            return importlib.import_module(self.name)
        except ModuleNotFoundError:
            raise missing_extra(f"a {class_name} from {self.name}", self.name, "import") from None

    def model_class(self, class_name: str) -> Any:
        found = getattr(self.module(class_name), class_name, None)
        if found is None:
            raise VqtoolError(f"vqtool cannot run a {class_name} from {self.name}")
        return found

    def version(self) -> str:
        return str(self.module("model").__version__)

    def load(self, class_name: str, folder: Path, *, safetensors: bool) -> Any:
        """The model saved in `folder`: safetensors weights, or with `safetensors` False the pickled ones."""
        cls = self.model_class(class_name)
        # The libraries draw progress bars on stderr while loading: vqtool's own lines say what happened.
        importlib.import_module(f"{self.name}.utils.logging").disable_progress_bar()
        options = dict(self.load_options)
        return cls.from_pretrained(str(folder), local_files_only=True, use_safetensors=safetensors, **options)

    def build(self, class_name: str, config: dict[str, Any]) -> Any:
        raise NotImplementedError


class _Diffusers(LibraryAdapter):
    name = "diffusers"
    # low_cpu_mem_usage needs accelerate, and says so at length where that is not installed.
    load_options = (("low_cpu_mem_usage", False),)

    def build(self, class_name: str, config: dict[str, Any]) -> Any:
        return self.model_class(class_name).from_config(config)


class _Transformers(LibraryAdapter):
    name = "transformers"
    # No code from the folder, whatever its config.json's auto_map says.
    load_options = (("trust_remote_code", False),)

    def build(self, class_name: str, config: dict[str, Any]) -> Any:
        cls = self.model_class(class_name)
        return cls(cls.config_class.from_dict(config))


LIBRARIES: dict[str, LibraryAdapter] = {adapter.name: adapter for adapter in (_Diffusers(), _Transformers())}


def build_imported(config: ImportedConfig) -> ImportedVQ:
    """The library's model, built from its stored configuration (weights not loaded), behind ImportedVQ."""
    family = FAMILIES.get((config.library, config.class_name))
    if family is None:
        known = ", ".join(f"{lib} {name}" for lib, name in FAMILIES)
        raise VqtoolError(f"vqtool imports {known}; not a {config.class_name} from {config.library}")
    return family(config, LIBRARIES[config.library].build(config.class_name, config.config))

"""Frozen configurations, stored inside every checkpoint so a model is rebuilt from its file alone."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from vqtool.images.limits import DEFAULT_MAX_PIXELS

# The reference design's four stride-2 layers (three encoder convolutions + before_quantize).
DOWNSAMPLE = 16
DOWNSAMPLES = (16, 8, 4, 2)


@dataclass(frozen=True)
class ModelConfig:
    """The VQ-VAE's shape; the defaults are the reference design (K = D = 256, 32x32 RGB, factor 16).

    The other fields build the family users compare with (taming-transformers, LlamaGen): a smaller
    `downsample` keeps more tokens per image (the encoder's last stride-2 layers become stride-1 3x3
    convolutions), `res_blocks` adds residual blocks at the latent resolution in encoder and decoder,
    `lookup_dim` looks codes up in a low-dimensional projection of the latent (factorized codes), and
    `l2_codes` compares l2-normalised latents and codes (cosine similarity).
    """

    codes: int = 256
    dim: int = 256
    image_size: int = 32
    channels: tuple[int, ...] = (32, 64, 128)
    downsample: int = DOWNSAMPLE
    res_blocks: int = 0
    lookup_dim: int | None = None
    l2_codes: bool = False

    def __post_init__(self) -> None:
        if self.codes < 2:
            raise ValueError(f"codes must be at least 2, got {self.codes}")
        if self.dim < 1:
            raise ValueError(f"dim must be positive, got {self.dim}")
        if not self.channels or min(self.channels) < 1:
            raise ValueError(f"channels must be positive widths, got {self.channels}")
        if self.downsample not in DOWNSAMPLES:
            raise ValueError(f"downsample must be one of {', '.join(map(str, DOWNSAMPLES))}, got {self.downsample}")
        if self.halvings > len(self.channels) + 1:
            raise ValueError(
                f"downsample {self.downsample} needs {self.halvings} stride-2 layers, but {len(self.channels)} "
                f"channel widths give {len(self.channels) + 1}"
            )
        if self.image_size < self.downsample or self.image_size % self.downsample:
            raise ValueError(f"image_size must be a positive multiple of {self.downsample}, got {self.image_size}")
        if self.res_blocks < 0:
            raise ValueError(f"res_blocks must be 0 or more, got {self.res_blocks}")
        if self.lookup_dim is not None and not 1 <= self.lookup_dim <= self.dim:
            raise ValueError(f"lookup_dim must be between 1 and dim ({self.dim}), got {self.lookup_dim}")

    @property
    def halvings(self) -> int:
        return self.downsample.bit_length() - 1

    @property
    def strides(self) -> tuple[int, ...]:
        """Stride of each encoder convolution and then of before_quantize: the first `halvings` are 2."""
        return tuple(2 if index < self.halvings else 1 for index in range(len(self.channels) + 1))

    @property
    def search_dim(self) -> int:
        """Dimension in which codes are compared and stored: lookup_dim when factorized, else dim."""
        return self.lookup_dim or self.dim

    @property
    def grid(self) -> int:
        """Side of the code grid for an image of `image_size`."""
        return self.image_size // self.downsample

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Fields a checkpoint lacks (written before they existed) take the reference design's values."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        if "channels" in values:
            values["channels"] = tuple(int(c) for c in values["channels"])
        return cls(**values)


LR_SCHEDULES = ("constant", "cosine")
# How an imported model's codes are searched: as its library does, or as its original design does (where they differ).
QUANTIZERS = ("library", "original")
# What `vqtool import` reads: a diffusers or transformers folder in the library's own layout, or an original
# checkpoint as its authors published it (vqtool.model.originals reads those).
LIBRARY_LAYOUT = "library"
LLAMAGEN, JANUS, TAMING = "llamagen", "janus", "taming"
ORIGINAL_FORMATS = (LLAMAGEN, JANUS, TAMING)
SOURCE_FORMATS = (LIBRARY_LAYOUT, *ORIGINAL_FORMATS)


@dataclass(frozen=True)
class TrainConfig:
    """How a run trains; `steps` overrides `epochs` when given."""

    epochs: int = 10
    steps: int | None = None
    batch_size: int = 128
    lr: float = 1e-3
    # "constant" is the article's; "cosine" decays the rate to 0 over the run after a linear warm-up.
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    # With the constant schedule: decay the rate linearly to 0 over the run's last this many steps.
    cooldown_steps: int = 0
    beta: float = 0.25
    # Adam's second-moment decay; PyTorch's default is the article's. Lower forgets old gradient scales sooner,
    # which suits a codebook whose assignments keep changing (LlamaGen trains its tokenizers with 0.95).
    adam_beta2: float = 0.999
    # Gradient through the quantizer: straight-through (the article's) or the rotation trick (Fifty et al., 2024).
    rotation_trick: bool = False
    # Decay of an exponential moving average of the weights (0: none). Validation, figures, checkpoints and exports
    # use the averaged weights, which smooths out the step-to-step noise a constant learning rate leaves in them.
    average_weights: float = 0.0
    # Weight of the codebook-usage term (train/codebook.py usage_divergence; 0: none) and the temperature of the soft
    # assignments it is computed from (LlamaGen's 0.01).
    usage_loss: float = 0.0
    usage_temperature: float = 0.01
    seed: int = 0
    device: str = "auto"
    steps_per_epoch: int | None = None
    # Codebook health, all off by default so the default run is the article's model.
    ema: bool = False
    ema_decay: float = 0.99
    ema_epsilon: float = 1e-5
    kmeans_init: bool = False
    restart_dead: int | None = None
    # How --data is read; kept so that --resume, export and parity read the collection the same way.
    max_pixels: int = DEFAULT_MAX_PIXELS
    skip_bad: bool = False
    val_data: str | None = None
    # Reader processes (None: one per four cores); batches do not depend on it, except from tar shards.
    workers: int | None = None

    def __post_init__(self) -> None:
        if self.max_pixels < 1:
            raise ValueError(f"--max-pixels must be at least 1, got {self.max_pixels}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"learning rate must be positive, got {self.lr}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warm-up steps must be 0 or more, got {self.warmup_steps}")
        if self.cooldown_steps < 0:
            raise ValueError(f"--cooldown-steps must be 0 or more, got {self.cooldown_steps}")
        if self.cooldown_steps and self.lr_schedule != "constant":
            raise ValueError("--cooldown-steps ends a constant rate; the cosine schedule already decays to 0")
        if not 0 < self.adam_beta2 < 1:
            raise ValueError(f"--adam-beta2 must be between 0 and 1, got {self.adam_beta2}")
        if not 0 <= self.average_weights < 1:
            raise ValueError(f"--average-weights takes a decay from 0 (off) to below 1, got {self.average_weights}")
        if self.usage_loss < 0:
            raise ValueError(f"--usage-loss must be 0 or more, got {self.usage_loss}")
        if not self.usage_temperature > 0:
            raise ValueError(f"the usage temperature must be positive, got {self.usage_temperature}")
        if self.beta < 0:
            raise ValueError(f"beta must be non-negative, got {self.beta}")
        if not 0 < self.ema_decay < 1:
            raise ValueError(f"EMA decay must be between 0 and 1, got {self.ema_decay}")
        if self.restart_dead is not None and self.restart_dead < 1:
            raise ValueError(f"--restart-dead takes a number of steps >= 1, got {self.restart_dead}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ValueError(f"steps per epoch must be at least 1, got {self.steps_per_epoch}")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"--workers must be 0 or more, got {self.workers}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

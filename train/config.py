"""Frozen configurations, stored inside every checkpoint so a model is rebuilt from its file alone."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from vqtool.limits import DEFAULT_MAX_PIXELS

# Four stride-2 layers between image and code grid (three encoder convs + before_quantize).
DOWNSAMPLE = 16


@dataclass(frozen=True)
class ModelConfig:
    """The VQ-VAE's shape; the defaults are the reference design (K = D = 256, 32x32 RGB)."""

    codes: int = 256
    dim: int = 256
    image_size: int = 32
    channels: tuple[int, int, int] = (32, 64, 128)

    def __post_init__(self) -> None:
        if self.codes < 2:
            raise ValueError(f"codes must be at least 2, got {self.codes}")
        if self.dim < 1:
            raise ValueError(f"dim must be positive, got {self.dim}")
        if self.image_size < DOWNSAMPLE or self.image_size % DOWNSAMPLE:
            raise ValueError(f"image_size must be a positive multiple of {DOWNSAMPLE}, got {self.image_size}")

    @property
    def grid(self) -> int:
        """Side of the code grid for an image of `image_size`."""
        return self.image_size // DOWNSAMPLE

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        if "channels" in values:
            values["channels"] = tuple(int(c) for c in values["channels"])
        return cls(**values)


@dataclass(frozen=True)
class TrainConfig:
    """How a run trains; `steps` overrides `epochs` when given."""

    epochs: int = 10
    steps: int | None = None
    batch_size: int = 128
    lr: float = 1e-3
    beta: float = 0.25
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
        if self.beta < 0:
            raise ValueError(f"beta must be non-negative, got {self.beta}")
        if not 0 < self.ema_decay < 1:
            raise ValueError(f"EMA decay must be between 0 and 1, got {self.ema_decay}")
        if self.restart_dead is not None and self.restart_dead < 1:
            raise ValueError(f"--restart-dead takes a number of steps >= 1, got {self.restart_dead}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ValueError(f"steps per epoch must be at least 1, got {self.steps_per_epoch}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

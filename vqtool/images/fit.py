"""How an image reaches the model's size: one value, `Fit`, that every reader (encode, training, export, parity,
the API) is given instead of separate resize, crop and pixel-limit knobs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vqtool.errors import VqtoolError
from vqtool.images.limits import DEFAULT_MAX_PIXELS

# The command line's --crop values: resize the whole image, or cut the centre square of its short side first.
CROPS = ("resize", "center")
# The ways an image reaches the model: resized whole, its centre square resized, or kept as it is.
STRETCH, CENTER, KEEP = "stretch", "center", "keep"


@dataclass(frozen=True)
class Fit:
    """`mode`: stretch (resize the whole image to the model's size, bicubic), center (the centre square of the short
    side, then resized: the preprocessing most published tokenizers were trained with) or keep (as it is; its sides
    must be multiples of the model's factor). `max_pixels`: a file whose header declares more is refused before it
    is decoded (decompression bombs)."""

    mode: str = STRETCH
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.mode not in (STRETCH, CENTER, KEEP):
            raise VqtoolError(f"an image is fitted by stretch, center or keep, not {self.mode!r}")

    @classmethod
    def of(cls, resize: bool = True, crop: str = "resize", max_pixels: int = DEFAULT_MAX_PIXELS) -> Fit:
        """The Fit that the command line's --resize/--no-resize and --crop (and the API's `resize` and `crop`) say."""
        if crop not in CROPS:
            raise VqtoolError(f"--crop takes {' or '.join(CROPS)}, got {crop!r}")
        return cls(KEEP if not resize else CENTER if crop == "center" else STRETCH, max_pixels)

    @property
    def resizes(self) -> bool:
        return self.mode != KEEP

    def apply(self, pixels: np.ndarray, size: int, multiple: int, path: str | Path) -> np.ndarray:
        """`pixels` brought to size x size, or kept where the mode keeps them (their sides multiples of `multiple`)."""
        height, width = pixels.shape[:2]
        if self.mode == KEEP:
            if height % multiple or width % multiple:
                raise VqtoolError(
                    f"{width}x{height} is not a multiple of {multiple}; drop --no-resize to resize it", path
                )
            return pixels
        if (height, width) == (size, size):
            return pixels
        if self.mode == CENTER and height != width:
            side = min(height, width)
            top, left = (height - side) // 2, (width - side) // 2
            pixels = np.ascontiguousarray(pixels[top : top + side, left : left + side])
        resized = Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)
        return np.asarray(resized, dtype=np.uint8)

"""The photographs vqtool uses when the user gives none: natural RGB photographs shipped inside the scikit-image
wheel (never fetched), for the default training data and for checking imported models at their own size."""

from __future__ import annotations

from importlib.resources import files

import numpy as np

from vqtool.errors import VqtoolError

EMBEDDED_PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
)


def read_embedded_photo(name: str, short_side: int) -> np.ndarray:
    """One of EMBEDDED_PHOTOS as uint8 RGB, scaled down (never up) so that its short side is `short_side`."""
    from PIL import Image

    try:
        source = files("skimage.data") / name
    except ModuleNotFoundError:
        raise VqtoolError(
            "the embedded photographs need scikit-image, which is not installed: pip install 'vqtool[train]'"
        ) from None
    with Image.open(source) as image:  # type: ignore[arg-type]
        rgb = image.convert("RGB")
        scale = short_side / min(rgb.size)
        if scale < 1:
            rgb = rgb.resize((round(rgb.width * scale), round(rgb.height * scale)), Image.Resampling.LANCZOS)
        return np.asarray(rgb, dtype=np.uint8)


def embedded_photographs(size: int, per_photo: int = 5) -> np.ndarray:
    """uint8 N x size x size x 3 views of the embedded photographs, as tokenizers are fed: each photograph's short
    side resized to `size` and its centre cut, then `per_photo - 1` more squares cut from a view zoomed in by half."""
    from PIL import Image

    views = []
    for name in EMBEDDED_PHOTOS:
        photo = Image.fromarray(read_embedded_photo(name, 10**6))
        for zoom in (1.0, 1.5)[: 1 + (per_photo > 1)]:
            side = round(size * zoom)
            scale = side / min(photo.size)
            scaled = np.asarray(
                photo.resize(
                    (max(side, round(photo.width * scale)), max(side, round(photo.height * scale))),
                    Image.Resampling.BICUBIC,
                )
            )
            height, width = scaled.shape[:2]
            if zoom == 1.0:
                spots = [((height - size) // 2, (width - size) // 2)]
            else:
                spots = [(0, 0), (0, width - size), (height - size, 0), (height - size, width - size)][: per_photo - 1]
            views += [scaled[top : top + size, left : left + size] for top, left in spots]
    return np.stack(views)

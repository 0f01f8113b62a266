"""TokenizeBatch: the callable class Ray Data's `map_batches` runs in a pool of actors, one export opened in each."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np

from vqtool.errors import VqtoolError
from vqtool.images.fit import Fit
from vqtool.images.reading import decode_rgb
from vqtool.runtime.select import RuntimeChoice

if TYPE_CHECKING:
    from typing_extensions import Unpack

DEFAULT_BATCH = 64


class TokenizeKeywords(TypedDict, total=False):
    """TokenizeBatch's keywords for its runtime (RuntimeChoice's fields) and its fit (Fit.of's), in place of the
    `runtime` and `fit` values themselves."""

    backend: str
    device: str
    precision: str
    threads: int | None
    engines: bool
    resize: bool
    crop: str
    max_pixels: int


class TokenizeBatch:
    """A batch of images in, the same batch with its codes added out; the export is opened once per actor.

        ds.map_batches(TokenizeBatch, fn_constructor_kwargs={"model": "export"}, concurrency=4, batch_size=256)

    The batch's `image_column` holds decoded images (uint8 H x W x 3, as `ray.data.read_images(mode="RGB")`
    gives them: one N x H x W x 3 array, or an array per row when sizes differ) or encoded image files' bytes (a
    Parquet column of img2dataset's, read with `ray.data.read_parquet`; datasets' {bytes, path} structs too).
    `codes` (N x h x w, the smallest unsigned type that holds the model's codes) is added under `codes_column`.
    Images not of the model's size are resized as `vqtool encode` does (`crop="center"`: the centre square of
    the short side first; `resize=False`: sides must be multiples of the model's factor), or as `fit` says.
    `backend`, `device`, `precision`, `threads` and `engines` are `vqtool.load`'s (or `runtime`, a RuntimeChoice,
    says them all); `batch_size` is the images per graph call. With
    `runtime_column`, each row also names the runtime that encoded it (onnxruntime, openvino, ...). With
    `keep_images=False` the image column is left out of what the batch returns: the pixels go no further than
    the actor (a column dropped by a later stage of its own needs a CPU that the actors may all hold). With
    `engines=False`, TensorRT engine files in the export are never run (`vqtool.load`'s).
    """

    def __init__(
        self,
        model: str | Path,
        *,
        image_column: str = "image",
        codes_column: str = "codes",
        batch_size: int = DEFAULT_BATCH,
        runtime_column: str | None = None,
        keep_images: bool = True,
        runtime: RuntimeChoice | None = None,
        fit: Fit | None = None,
        **keywords: Unpack[TokenizeKeywords],
    ) -> None:
        from vqtool.api import load

        unknown = set(keywords) - set(TokenizeKeywords.__annotations__)
        if unknown:
            raise TypeError(f"TokenizeBatch got unexpected keywords: {', '.join(sorted(unknown))}")
        picked: dict[str, Any] = dict(keywords)
        fit_keywords = {k: picked.pop(k) for k in ("resize", "crop", "max_pixels") if k in picked}
        self.fit = fit or Fit.of(**fit_keywords)
        self.tokenizer = load(model, runtime=runtime or RuntimeChoice(**picked))
        self.image_column, self.codes_column = image_column, codes_column
        self.batch_size = batch_size
        self.runtime_column, self.keep_images = runtime_column, keep_images

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        if self.image_column not in batch:
            raise VqtoolError(
                f"the batch has no column {self.image_column!r} (it has {', '.join(batch)}); pass image_column"
            )
        column = batch[self.image_column]
        if len(column) == 0:
            side = self.tokenizer.image_size
            codes = np.zeros((0, *self.tokenizer.grid(side, side)), self.tokenizer.code_dtype)
        else:
            images = (
                column if _is_pixel_array(column) else [self._pixels(cell, batch, i) for i, cell in enumerate(column)]
            )
            codes = self.tokenizer.encode(images, batch_size=self.batch_size, fit=self.fit)
        added = {self.codes_column: codes}
        if self.runtime_column is not None:
            added[self.runtime_column] = np.full(len(column), self.tokenizer.backend, dtype=object)
        kept = batch if self.keep_images else {k: v for k, v in batch.items() if k != self.image_column}
        return {**kept, **added}

    def _pixels(self, cell: Any, batch: Mapping[str, Any], row: int) -> np.ndarray:
        """One row's image as uint8 H x W x 3: decoded already, or decoded here from its file's bytes."""
        if isinstance(cell, Mapping):  # datasets' Image feature: {"bytes": ..., "path": ...}
            cell = cell.get("bytes")
        if isinstance(cell, bytes | bytearray | memoryview):
            paths = batch.get("path")
            name = str(paths[row]) if paths is not None else f"{self.image_column}[{row}]"
            return decode_rgb(bytes(cell), name, self.fit.max_pixels)
        pixels = np.asarray(cell)
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
            raise VqtoolError(
                f"row {row} of column {self.image_column!r} is {pixels.dtype} {pixels.shape}, not uint8 H x W x 3 "
                "pixels or an image file's bytes (read images with mode='RGB')"
            )
        return pixels


def _is_pixel_array(column: Any) -> bool:
    return isinstance(column, np.ndarray) and column.dtype == np.uint8 and column.ndim == 4 and column.shape[3] == 3

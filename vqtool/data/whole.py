"""A collection read whole into memory at one size: what export's parity and calibration compare and calibrate on."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vqtool.data.cifar import CIFAR_TEST_BATCH, is_cifar_folder
from vqtool.data.refs import ref_name
from vqtool.data.sets import ImageSet, ref_pixels
from vqtool.data.specs import cifar_set, image_set
from vqtool.errors import VqtoolError
from vqtool.images.fit import Fit
from vqtool.images.reading import SkippedFile, read_each


def read_images(images: ImageSet, size: int, fit: Fit, skipped: list[SkippedFile] | None = None) -> np.ndarray:
    """Every image of the set brought to size x size as `fit` says (one that keeps sizes resizes here: the images
    are stacked), as uint8 N x size x size x 3. An image that cannot be read stops the reading, unless `skipped`
    collects it."""
    if not fit.resizes:
        fit = Fit(max_pixels=fit.max_pixels)
    refs = images.refs(0, len(images.keys))

    def read(ref: object) -> np.ndarray:
        return fit.apply(ref_pixels(ref, fit.max_pixels), size, 1, ref_name(ref))  # type: ignore[arg-type]

    pixels = [image for _, image in read_each(refs, read, skipped, file_of=ref_name)]
    if not pixels:
        raise VqtoolError("none of these images could be read")
    return np.stack(pixels)


def read_image_set(
    path: Path, size: int, *, fit: Fit | None = None, skipped: list[SkippedFile] | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """The images `path` names (any form image_set reads) at size x size, and the collection's own validation
    images where it has them (CIFAR-10's test batch).

    Image files are brought to the size as `fit` says (default: resized whole), and those larger than its pixel
    limit are refused from their header. A file that cannot be read raises the one-line error, or, when a
    `skipped` list is given, is left out and added to it.
    """
    fit = fit or Fit()
    try:
        images = read_images(image_set([path]), size, fit, skipped)
    except VqtoolError as exc:
        raise exc if exc.path is not None else VqtoolError(exc.reason, path) from None
    own_val = None
    if is_cifar_folder(path) and (path / CIFAR_TEST_BATCH).is_file():
        own_val = read_images(cifar_set(path, test=True), size, fit)
    return images, own_val

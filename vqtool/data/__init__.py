"""One reader of image collections: any form the user names (files, folders, lists, tar shards, Parquet, .npy/.npz,
CIFAR-10) resolved once to an ImageSet, read alike by encode, training, export, parity and the API."""

from vqtool.data.refs import ImageRef, ref_name
from vqtool.data.sets import ImageSet, as_image_set, ref_pixels
from vqtool.data.specs import image_set

__all__ = ["ImageRef", "ImageSet", "as_image_set", "image_set", "ref_name", "ref_pixels"]

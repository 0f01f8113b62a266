"""vqtool: train a VQ-VAE image tokenizer, export it to ONNX/TensorRT, and run it with verified parity."""

import os as _os

__version__ = "0.1.0"

# The repository keeps train/ and export/ beside vqtool/, and the wheel installs them as vqtool.train and
# vqtool.export (pyproject's package-dir), so nothing but `vqtool` lands at the top of site-packages.
# Run from a checkout with PYTHONPATH instead of an install, the same names resolve through this path entry.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "train")) and _os.path.isfile(
    _os.path.join(_checkout, "train", "model.py")
):
    __path__.append(_checkout)

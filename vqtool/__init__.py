"""vqtool: train a VQ-VAE image tokenizer, export it to ONNX/TensorRT, and run it with verified parity.

The Python API (no PyTorch needed):

    import vqtool
    tok = vqtool.load("runs/run-001/export")   # an export folder made by `vqtool export`
    codes = tok.encode(images)                  # uint8 N x H x W x 3 -> N x h x w codes
    images = tok.decode(codes)                  # -> uint8 N x H x W x 3

Every user error raises vqtool.VqtoolError, whose message names the file it concerns.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vqtool.errors import VqtoolError

__version__ = "0.1.0"
__all__ = [
    "Contract",
    "DecodeResult",
    "EncodeOptions",
    "EncodeResult",
    "Fit",
    "RuntimeChoice",
    "Tokenizer",
    "VqtoolError",
    "load",
]
_API = frozenset(__all__) - {"VqtoolError"}

if TYPE_CHECKING:
    from vqtool.api import Contract, DecodeResult, EncodeOptions, EncodeResult, Fit, RuntimeChoice, Tokenizer, load


def __getattr__(name: str) -> Any:
    # The API loads on first use: `vqtool --help` and the training processes do not pay for NumPy, Pillow
    # and the runtime modules they never call.
    if name in _API:
        from vqtool import api

        return getattr(api, name)
    raise AttributeError(f"module 'vqtool' has no attribute {name!r}")

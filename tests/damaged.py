"""A seeded corpus of damaged image files, made from real photographs in PNG, JPEG, WebP and BMP.

Each file is damaged the way files in a scraped collection are: cut short, bytes flipped, noise,
empty, a header that declares a huge image (a decompression bomb), a wiped header, a web page saved
under an image name, the wrong extension, junk after the image. Some of them stay readable (a wrong
extension, trailing junk, a flip in the pixel data); the tests check each file is read or refused in
one line, never a traceback.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import photo

FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP", "bmp": "BMP"}
SOURCES = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg")


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _png_with_size(data: bytes, width: int, height: int, fix_crc: bool) -> bytes:
    """Rewrite the IHDR's width and height (a header declaring a huge image), with a valid CRC or not."""
    ihdr = bytearray(data[8 + 8 : 8 + 8 + 13])
    ihdr[0:8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(ihdr), zlib.crc32(b"IHDR")) if fix_crc else 0xDEADBEEF
    return data[:16] + bytes(ihdr) + struct.pack(">I", crc) + data[33:]


def _bmp_with_size(data: bytes, width: int, height: int) -> bytes:
    return data[:18] + struct.pack("<ii", width, height) + data[26:]


def _jpeg_with_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite the frame header (SOF0/SOF2): 16-bit height then width, after the precision byte."""
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        at = data.find(marker)
        if at >= 0:
            return data[: at + 5] + struct.pack(">HH", height, width) + data[at + 9 :]
    return data


def _webp_with_size(data: bytes, width: int, height: int) -> bytes:
    """A lossy WebP's VP8 frame header keeps 14-bit width and height after the start code."""
    at = data.find(b"\x9d\x01\x2a")
    if at < 0:
        return data
    return data[: at + 3] + struct.pack("<HH", width & 0x3FFF, height & 0x3FFF) + data[at + 7 :]


def _huge(data: bytes, ext: str, rng: np.random.Generator) -> bytes:
    side = int(rng.integers(30_000, 100_001))
    if ext == "png":
        return _png_with_size(data, side, side, fix_crc=bool(rng.integers(0, 2)))
    if ext == "bmp":
        return _bmp_with_size(data, side, side)
    if ext == "jpg":
        return _jpeg_with_size(data, min(side, 65_535), min(side, 65_535))
    return _webp_with_size(data, 16_383, 16_383)


def _zero_size(data: bytes, ext: str) -> bytes:
    rewrite = {"png": lambda: _png_with_size(data, 0, 0, fix_crc=True), "bmp": lambda: _bmp_with_size(data, 0, 0)}
    return rewrite.get(ext, lambda: _jpeg_with_size(data, 0, 0) if ext == "jpg" else _webp_with_size(data, 0, 0))()


def _damages(rng: np.random.Generator) -> dict[str, Callable[[bytes, str], bytes]]:
    def flip(data: bytes, ext: str) -> bytes:
        out = bytearray(data)
        for at in rng.integers(0, len(out), int(rng.integers(1, 12))):
            out[at] ^= 1 << int(rng.integers(0, 8))
        return bytes(out)

    def wipe(data: bytes, ext: str) -> bytes:
        cut = int(rng.choice([4, 16, 32, 64]))
        return bytes(cut) + data[cut:]

    return {
        "truncated": lambda data, ext: data[: int(rng.integers(1, max(2, len(data) - 1)))],
        "flipped": flip,
        "noise": lambda data, ext: rng.integers(0, 256, int(rng.integers(1, 4096)), dtype=np.uint8).tobytes(),
        "empty": lambda data, ext: b"",
        "zeros": lambda data, ext: bytes(int(rng.integers(1, 2048))),
        "huge-header": lambda data, ext: _huge(data, ext, rng),
        "wiped-header": wipe,
        "html": lambda data, ext: b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n",
        "trailing-junk": lambda data, ext: data + rng.integers(0, 256, 512, dtype=np.uint8).tobytes(),
        "signature-only": lambda data, ext: data[:8],
        "zero-size": _zero_size,
    }


def write_damaged_corpus(root: Path, seed: int = 0, per_kind: int = 4) -> list[Path]:
    """About 145 files: every damage on every format, `per_kind` seeded variants each, plus wrong extensions."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    originals = {}
    for ext, fmt in FORMATS.items():
        source = photo(SOURCES[len(originals) % len(SOURCES)]).convert("RGB")
        originals[ext] = _encoded(source.resize((48, 40)), fmt)
    damages = _damages(rng)
    written = []
    for ext, data in originals.items():
        for kind, damage in damages.items():
            for variant in range(per_kind if kind not in ("empty", "html", "zero-size") else 1):
                path = root / f"{kind}-{variant}.{ext}"
                path.write_bytes(damage(data, ext))
                written.append(path)
    for ext, data in originals.items():  # real images under another format's extension
        wrong = next(other for other in FORMATS if other != ext)
        path = root / f"wrong-extension-{ext}.{wrong}"
        path.write_bytes(data)
        written.append(path)
    return written

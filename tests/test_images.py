"""Reading image files: formats and modes, stable order, and one-line errors that name the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vqtool.errors import VqtoolError
from vqtool.images.fit import Fit
from vqtool.images.reading import list_images, read_rgb


def test_every_mode_becomes_uint8_rgb(mixed_folder: Path) -> None:
    for path in list_images([mixed_folder]):
        pixels = read_rgb(path)
        assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3, path


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path: Path) -> None:
    ramp = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    pixels = read_rgb(tmp_path / "ramp16.png")
    assert np.array_equal(pixels[..., 0], np.arange(256, dtype=np.uint8).reshape(16, 16))
    assert np.array_equal(pixels[..., 0], pixels[..., 2])


def test_grey_and_palette_keep_their_values(tmp_path: Path) -> None:
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(grey).save(tmp_path / "grey.png")
    assert np.array_equal(read_rgb(tmp_path / "grey.png"), np.repeat(grey[..., None], 3, axis=2))
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=256).save(tmp_path / "p.png")
    assert np.abs(read_rgb(tmp_path / "p.png").astype(int) - rgb).max() < 40


def test_listing_is_recursive_sorted_and_skips_other_files(tmp_path: Path) -> None:
    for name in ["b/z.png", "a.JPG", "b/a.webp", "c.bmp", "notes.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert [p.relative_to(tmp_path).as_posix() for p in list_images([tmp_path])] == [
        "a.JPG",
        "b/a.webp",
        "b/z.png",
        "c.bmp",
    ]


def test_folder_without_images_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no pictures here")
    with pytest.raises(VqtoolError, match="no images found") as info:
        list_images([tmp_path])
    assert str(tmp_path) in str(info.value)


def test_truncated_image_names_the_file(tmp_path: Path) -> None:
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(tmp_path / "whole.jpg", quality=95)
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    with pytest.raises(VqtoolError, match="truncated") as info:
        read_rgb(tmp_path / "cut.jpg")
    assert str(info.value).startswith(str(tmp_path / "cut.jpg"))
    assert "\n" not in str(info.value)


def test_non_image_file_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "fake.png").write_text("this is text, not a PNG")
    with pytest.raises(VqtoolError, match="not an image file") as info:
        read_rgb(tmp_path / "fake.png")
    assert str(tmp_path / "fake.png") in str(info.value)


def test_resize_and_no_resize() -> None:
    pixels = np.zeros((48, 80, 3), np.uint8)
    assert Fit.of(resize=True).apply(pixels, 32, 16, Path("x")).shape == (32, 32, 3)
    assert Fit.of(resize=False).apply(pixels, 32, 16, Path("x")).shape == (48, 80, 3)
    with pytest.raises(VqtoolError, match="not a multiple of 16"):
        Fit.of(resize=False).apply(np.zeros((50, 64, 3), np.uint8), 32, 16, Path("odd.png"))


def test_written_png_reads_back_exactly(tmp_path: Path) -> None:
    from vqtool.images.writing import write_png

    pixels = np.random.default_rng(3).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    write_png(tmp_path / "x.png", pixels)
    with Image.open(tmp_path / "x.png") as image:
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (80, 48)
        assert np.array_equal(np.asarray(image), pixels)
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


@pytest.mark.parametrize("side", [8, 32, 64])  # rows stored uncompressed below 4 KiB, deflated above
def test_batches_of_pngs_read_back_exactly(tmp_path: Path, side: int) -> None:
    from vqtool.images.writing import STORE_BELOW_BYTES, write_pngs

    images = np.random.default_rng(side).integers(0, 256, (5, side, side, 3), dtype=np.uint8)
    images[:, : side // 2] = 40  # half flat, so deflate has something to remove
    names = [f"{i}.png" for i in range(5)]
    write_pngs(tmp_path, names, images)
    assert sorted(p.name for p in tmp_path.iterdir()) == names  # no temporary files left behind
    for name, pixels in zip(names, images, strict=True):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and np.array_equal(np.asarray(image), pixels)
    raw = side * (1 + 3 * side)
    size = (tmp_path / names[0]).stat().st_size
    assert (size > raw) if raw < STORE_BELOW_BYTES else (size < raw)


def test_fast_png_path_reads_exactly_what_pillow_reads(mixed_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("pyspng", reason="the fast-png extra is not installed")
    from vqtool.images import reading as images

    pngs = [p for p in list_images([mixed_folder]) if p.suffix == ".png"]
    fast = {p.name: images._read_rgb8_png(p) for p in pngs}
    # Only 8-bit RGB takes the libspng path; grey, RGBA, palette and 16-bit go to Pillow.
    assert {name for name, pixels in fast.items() if pixels is not None} == {"astronaut.png"}
    through_fast = {p.name: read_rgb(p) for p in pngs}
    monkeypatch.setattr(images, "_read_rgb8_png", lambda path, max_pixels: None)
    for path in pngs:
        assert np.array_equal(through_fast[path.name], read_rgb(path)), path


def test_fast_png_path_leaves_exif_and_broken_files_to_pillow(tmp_path: Path) -> None:
    pytest.importorskip("pyspng", reason="the fast-png extra is not installed")
    from vqtool.images.reading import _read_rgb8_png

    pixels = np.random.default_rng(0).integers(0, 256, (8, 16, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    Image.fromarray(pixels).save(tmp_path / "rotated.png", exif=exif)
    assert _read_rgb8_png(tmp_path / "rotated.png") is None
    assert read_rgb(tmp_path / "rotated.png").shape == (16, 8, 3)
    Image.fromarray(pixels).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    assert _read_rgb8_png(tmp_path / "cut.png") is None
    with pytest.raises(VqtoolError, match="cut.png"):
        read_rgb(tmp_path / "cut.png")

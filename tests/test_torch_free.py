"""Inference works where PyTorch cannot be imported; every command's help loads without it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli, write_mixed_folder


@pytest.fixture()
def no_torch(tmp_path: Path) -> dict[str, str]:
    """An environment in which `import torch` (and webdataset, which imports it) fails, as on a machine without
    PyTorch."""
    for name in ("torch", "webdataset"):
        blocker = tmp_path / "blocker" / name
        blocker.mkdir(parents=True)
        (blocker / "__init__.py").write_text(
            f"raise ModuleNotFoundError(\"No module named '{name}'\", name='{name}')\n"
        )
    from tests.conftest import REPO

    return {"PYTHONPATH": f"{tmp_path / 'blocker'}:{REPO}"}


def test_importing_the_cli_does_not_import_torch(no_torch: dict[str, str]) -> None:
    result = run_cli("--help", env=no_torch)
    assert result.returncode == 0, result.stderr
    for command in ("train", "export", "encode", "decode"):
        helped = run_cli(command, "--help", env=no_torch)
        assert helped.returncode == 0 and "Usage" in helped.stdout, (command, helped.stderr)


def test_encode_and_decode_run_without_torch(export_dir: Path, tmp_path: Path, no_torch: dict[str, str]) -> None:
    write_mixed_folder(tmp_path / "images")
    encoded = run_cli(
        "encode",
        str(tmp_path / "images"),
        "--model",
        str(export_dir),
        "--out",
        str(tmp_path / "codes.npy"),
        env=no_torch,
    )
    assert encoded.returncode == 0, encoded.stderr
    decoded = run_cli(
        "decode",
        str(tmp_path / "codes.npy"),
        "--model",
        str(export_dir),
        "--out",
        str(tmp_path / "recon"),
        env=no_torch,
    )
    assert decoded.returncode == 0, decoded.stderr
    assert np.load(tmp_path / "codes.npy").shape == (8, 2, 2)
    assert len(list((tmp_path / "recon").glob("*.png"))) == 8


def test_train_without_torch_says_what_to_install(no_torch: dict[str, str]) -> None:
    result = run_cli("train", "--steps", "1", env=no_torch)
    assert result.returncode == 1
    assert "needs PyTorch" in result.stderr and "pip install 'vqtool[train]'" in result.stderr


def test_every_form_of_collection_encodes_without_torch_to_the_same_codes(
    export_dir: Path, tmp_path: Path, no_torch: dict[str, str]
) -> None:
    """The same images as files, as tar shards (a brace pattern) and as a .npy: one reader, the runtime install."""
    import tarfile

    from PIL import Image

    pixels = np.random.default_rng(3).integers(0, 256, (6, 40, 48, 3), dtype=np.uint8)
    (tmp_path / "files").mkdir()
    for index, image in enumerate(pixels):
        Image.fromarray(image).save(tmp_path / "files" / f"{index:04d}.png")
    for shard in range(2):
        with tarfile.open(tmp_path / f"part-{shard}.tar", "w") as archive:
            for index in range(shard * 3, shard * 3 + 3):
                archive.add(tmp_path / "files" / f"{index:04d}.png", arcname=f"{index:04d}.png")
    np.save(tmp_path / "images.npy", pixels)
    forms = {"files": tmp_path / "files", "tar": tmp_path / "part-{0..1}.tar", "npy": tmp_path / "images.npy"}
    codes = {}
    for name, spec in forms.items():
        out = tmp_path / f"{name}.npy"
        encoded = run_cli("encode", str(spec), "--model", str(export_dir), "--out", str(out), env=no_torch)
        assert encoded.returncode == 0, (name, encoded.stderr)
        codes[name] = np.load(out)
    assert codes["files"].shape == (6, 2, 2)
    assert np.array_equal(codes["files"], codes["tar"]) and np.array_equal(codes["files"], codes["npy"])

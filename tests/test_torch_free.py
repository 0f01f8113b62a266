"""Inference works where PyTorch cannot be imported; every command's help loads without it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli, write_mixed_folder


@pytest.fixture()
def no_torch(tmp_path: Path) -> dict[str, str]:
    """An environment in which `import torch` fails, as on a machine without PyTorch."""
    blocker = tmp_path / "blocker" / "torch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
    from tests.conftest import REPO

    return {"PYTHONPATH": f"{blocker.parent}:{REPO}"}


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

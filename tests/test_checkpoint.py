"""Checkpoints rebuild the model from the file alone, refuse code, and fail in one line."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from vqtool.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from vqtool.model.config import ModelConfig, TrainConfig
from vqtool.model.vqvae import VQVAE


def test_model_is_rebuilt_from_the_file_alone(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = VQVAE(ModelConfig(codes=64, dim=32, image_size=64))
    save_checkpoint(tmp_path / "c.pt", model, TrainConfig(lr=3e-4), step=12, epoch=1, data="somewhere")
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert loaded.model_config == model.config and loaded.train_config.lr == 3e-4 and loaded.step == 12
    x = torch.rand(2, 3, 64, 64)
    assert torch.equal(loaded.model.encode(x), model.encode(x))


def test_missing_and_corrupt_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "absent.pt")
    model = VQVAE(ModelConfig(codes=16, dim=8))
    save_checkpoint(tmp_path / "good.pt", model, TrainConfig(), step=0, epoch=0, data=None)
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated") as info:
        load_checkpoint(tmp_path / "cut.pt")
    assert str(tmp_path / "cut.pt") in str(info.value) and "\n" not in str(info.value)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a vqtool checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


class _Exploit:
    def __reduce__(self):  # noqa: ANN204
        return (print, ("pwned",))


def test_a_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    torch.save({"format": "vqtool.checkpoint", "evil": _Exploit()}, tmp_path / "evil.pt", pickle_module=pickle)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")

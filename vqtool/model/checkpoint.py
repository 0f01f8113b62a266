"""Checkpoint files: weights, optimizer state and both configurations, written atomically."""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vqtool.errors import VqtoolError
from vqtool.formats.atomic import atomic_output
from vqtool.model.config import ModelConfig, TrainConfig
from vqtool.model.face import TokenizerModel
from vqtool.model.imported import IMPORTED, ImportedConfig, build_imported
from vqtool.model.vqvae import VQVAE

FORMAT = "vqtool.checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or not ours; the message names the file."""


@dataclass(frozen=True)
class Checkpoint:
    """Everything a checkpoint holds, with the model rebuilt from its stored configuration: vqtool's own VQ-VAE or
    a model imported from another library, behind the one face (vqtool.model.face)."""

    model: TokenizerModel
    model_config: ModelConfig | ImportedConfig
    train_config: TrainConfig
    step: int
    epoch: int
    data: str | None
    optimizer_state: dict[str, Any] | None
    extra: dict[str, Any]


def save_checkpoint(
    path: Path,
    model: TokenizerModel,
    train_config: TrainConfig,
    *,
    step: int,
    epoch: int,
    data: str | None,
    optimizer: torch.optim.Optimizer | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write to a temporary file beside `path`, then rename, so an interrupted save keeps the old file."""
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "torch_version": str(torch.__version__),
        "model_config": model.config.to_dict(),
        "train_config": train_config.to_dict(),
        "step": step,
        "epoch": epoch,
        "data": data,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "extra": extra or {},
    }
    with atomic_output(path) as temp:
        torch.save(payload, temp)


def _short_reason(exc: BaseException) -> str:
    """torch.load's errors run to paragraphs; keep the line that names the problem."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if line.startswith("WeightsUnpickler error:"):
            return line.removeprefix("WeightsUnpickler error:").strip().split(". ")[0]
    return lines[0] if lines else type(exc).__name__


def _rebuild(raw: dict[str, Any]) -> tuple[ModelConfig | ImportedConfig, TokenizerModel]:
    """The model a stored configuration describes, its weights not yet loaded."""
    if raw.get("family") == IMPORTED:
        imported = ImportedConfig.from_dict(raw)
        return imported, build_imported(imported)
    config = ModelConfig.from_dict(raw)
    return config, VQVAE(config)


# torch.load(weights_only=True) runs no code from the file from this version on (CVE-2025-32434).
SAFE_TORCH_LOAD = "2.6"


def require_safe_torch_load() -> None:
    """Refuse to read pickled weights with a PyTorch whose weights_only loader can still run code."""
    if torch.torch_version.TorchVersion(torch.__version__) < SAFE_TORCH_LOAD:
        raise VqtoolError(
            f"reading pickled weights needs PyTorch {SAFE_TORCH_LOAD} or later: before it, torch.load(weights_only="
            f"True) can run code from the file (CVE-2025-32434); this is {torch.__version__}: "
            f"pip install -U 'torch>={SAFE_TORCH_LOAD}'"
        )


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the model from the file alone; weights_only=True, so a checkpoint cannot run code."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        require_safe_torch_load()
    except VqtoolError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        reason = _short_reason(exc)
        raise CheckpointError(f"{path}: not a readable checkpoint (corrupt or truncated: {reason})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a vqtool checkpoint (no '{FORMAT}' header)")
    if type(payload.get("format_version", 0)) is not int:
        raise CheckpointError(f"{path}: damaged ('format_version' must be an integer)")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer vqtool (format {payload['format_version']}); upgrade vqtool")
    try:
        model_config, model = _rebuild(payload["model_config"])
        model.load_state_dict(payload["model"])
    except VqtoolError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: checkpoint weights do not match its configuration ({exc})") from None
    model.eval()
    try:
        return Checkpoint(
            model=model,
            model_config=model_config,
            train_config=TrainConfig.from_dict(payload.get("train_config", {})),
            step=int(payload.get("step", 0)),
            epoch=int(payload.get("epoch", 0)),
            data=payload.get("data"),
            optimizer_state=payload.get("optimizer"),
            extra=dict(payload.get("extra", {})),
        )
    except (TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path}: its training record is damaged ({_short_reason(exc)})") from None

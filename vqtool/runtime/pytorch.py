"""The PyTorch model itself as a runner: the one place the inference side loads PyTorch (export_dir/model.pt)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vqtool.errors import VqtoolError, missing_extra
from vqtool.formats.manifest import Manifest, verify_pytorch_file
from vqtool.runtime.base import GraphToOpen, Runner


class TorchRunner:
    """The exported PyTorch model itself (export_dir/model.pt), for comparison and as a fallback."""

    backend = "torch"

    def __init__(self, export_dir: Path, manifest: Manifest, role: str, device: str) -> None:
        try:
            import torch
        except ModuleNotFoundError:
            raise missing_extra("--backend torch", "PyTorch", "train") from None
        from vqtool.model.checkpoint import CheckpointError, load_checkpoint

        path = verify_pytorch_file(export_dir, manifest)
        if device == "cuda" and not torch.cuda.is_available():
            raise VqtoolError("--backend torch --device cuda: PyTorch sees no CUDA GPU here")
        self.device = torch.device(
            "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
        )
        if self.device.type == "cuda":
            # TF32 would round FP32 convolutions and matmuls to 10 mantissa bits: codes would stop being FP32's.
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        try:
            self.model = load_checkpoint(path).model.to(self.device).eval()
        except CheckpointError as exc:
            raise VqtoolError(str(exc)) from None
        self.role = role
        self.provider = f"PyTorch {torch.__version__} on {self.device.type}"
        self.torch = torch

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            data = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
            if self.role == "encoder":
                result = self.model.encode(self.model.model_input(data)).to(torch.int32)
            else:
                result = self.model.model_output(self.model.decode(data.long()))
            array: np.ndarray = result.cpu().numpy()
            return array

    def describe(self) -> str:
        return self.provider

    def pipelined(self) -> Runner:
        return self

    def close(self) -> None:
        pass


def load(graph: GraphToOpen) -> TorchRunner:
    """The runtime table's loader for the PyTorch model itself (the export's model.pt), on the CPU or CUDA."""
    export_dir, manifest = graph.export()
    return TorchRunner(export_dir, manifest, graph.role, graph.device)

"""PyTorch tensors in and out of the torch-free runtime: CPU tensors share memory with NumPy arrays, CUDA
tensors go straight to ONNX Runtime's CUDA provider through I/O binding.

torch is never imported here: a tensor is recognised by its type's module, so `import vqtool` and every
NumPy call stay torch-free, and torch is reached only through the tensors the caller passed in.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from vqtool.errors import VqtoolError


def is_tensor(value: object) -> bool:
    """A torch.Tensor, without importing torch (if torch is not loaded yet, nothing can be a tensor)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def to_numpy(tensor: Any) -> np.ndarray:
    """A CPU tensor as an array over the same memory (no copy); a CUDA tensor is copied to the host."""
    if tensor.requires_grad:
        tensor = tensor.detach()
    array: np.ndarray = tensor.cpu().numpy()  # .cpu() is the tensor itself when it already lives there
    return array


def like(array: np.ndarray, reference: Any) -> Any:
    """`array` as a tensor on `reference`'s device: over the same memory on the CPU, copied to a GPU."""
    torch = sys.modules["torch"]
    tensor = torch.from_numpy(array)
    return tensor if reference.device.type == "cpu" else tensor.to(reference.device)


def torch_dtype(dtype: np.dtype) -> Any:
    """The torch dtype of a NumPy one (uint16 and uint32 exist in torch 2.3 and later)."""
    torch = sys.modules["torch"]
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype


def run_bound(session: Any, tensor: Any, out_shape: tuple[int, ...], out_dtype: np.dtype) -> Any:
    """Run a one-input, one-output ONNX Runtime session on a CUDA tensor, result in a new CUDA tensor.

    I/O binding hands ONNX Runtime the tensors' device pointers, so nothing crosses to the host: the
    input is bound where it lies and the output is written into a tensor allocated here by PyTorch.
    """
    torch = sys.modules["torch"]
    tensor = tensor.contiguous()
    device_id = tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()
    output = torch.empty(out_shape, dtype=torch_dtype(out_dtype), device=tensor.device)
    binding = session.io_binding()
    in_dtype = np.dtype(str(tensor.dtype).removeprefix("torch."))
    binding.bind_input(
        session.get_inputs()[0].name, "cuda", device_id, in_dtype, tuple(tensor.shape), tensor.data_ptr()
    )
    binding.bind_output(session.get_outputs()[0].name, "cuda", device_id, out_dtype, out_shape, output.data_ptr())
    # ONNX Runtime runs on its own CUDA stream: PyTorch's pending work on the input must be done first.
    torch.cuda.current_stream(tensor.device).synchronize()
    try:
        session.run_with_iobinding(binding)
    except Exception as exc:  # ORT raises its own untyped errors
        raise VqtoolError(f"ONNX Runtime could not run on the CUDA tensor ({exc})") from None
    return output

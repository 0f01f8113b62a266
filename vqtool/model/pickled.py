"""The tensors of a pickled PyTorch checkpoint (a Lightning `.ckpt`, LlamaGen's `.pt`), read without running
anything in it.

Such files hold more than weights: Lightning stores callbacks, optimizer and scheduler states and hyper-parameter
objects of the training code's own classes, LlamaGen an `argparse.Namespace`; `torch.load(weights_only=True)`
refuses them all. This reads them with that same loader (PyTorch's weights-only unpickler: it rebuilds tensors and
plain containers, and calls nothing else), told that every other class or function the file names is `Inert`: a
stand-in that takes whatever arguments and state the file hands it and keeps none of them. So nothing the file
names is imported or called; the names are listed first from the pickle's opcodes, without running it, and one
from a module PyTorch never lets a checkpoint reach (`os`, `sys`) is refused in one line. Storages are mapped
from the file, not read, so tensors the caller does not keep (optimizer states, a discriminator) cost no memory.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vqtool.errors import VqtoolError, first_line
from vqtool.model.checkpoint import require_safe_torch_load

# PyTorch's weights-only loader refuses names from these modules even when told they are safe: a file naming one is
# refused before loading, in vqtool's words.
FORBIDDEN_MODULES = ("os", "sys", "posix", "nt")


class Inert:
    """What every class or function a checkpoint names, other than PyTorch's own tensor machinery, becomes: called
    or built with any arguments, given any state, it does nothing and keeps nothing."""

    __slots__ = ()

    def __new__(cls, *args: Any, **kwargs: Any) -> Inert:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __repr__(self) -> str:
        return "<left out: an object of the training code's own>"


def named_globals(path: Path) -> list[str]:
    """Every class or function the checkpoint's pickle names that PyTorch's weights-only loader does not know, read
    from its opcodes without unpickling."""
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except (ValueError, RuntimeError, OSError, zipfile.BadZipFile, pickle.UnpicklingError) as exc:
        raise VqtoolError(f"not a PyTorch checkpoint saved by torch.save ({first_line(exc)})", path) from None


def read_pickled_checkpoint(path: Path) -> Any:
    """What the checkpoint holds, with its tensors mapped from the file and everything that is not a tensor, a
    number, a string or a plain container replaced by an `Inert`."""
    require_safe_torch_load()
    if not path.is_file():
        raise VqtoolError("no such checkpoint file", path)
    names = named_globals(path)
    forbidden = [name for name in names if name.split(".")[0] in FORBIDDEN_MODULES]
    if forbidden:
        raise VqtoolError(
            f"names {forbidden[0]}, which only code needs: vqtool reads the tensors of a checkpoint, never its code",
            path,
        )
    stand_ins: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [(Inert, name) for name in names]
    try:
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # the weights-only unpickler's refusal of an opcode or a call, or a damaged file
        raise VqtoolError(f"cannot be read as tensors alone ({first_line(exc)})", path) from None


def tensors_under(payload: Any, key: str | None, path: Path) -> dict[str, torch.Tensor]:
    """The name -> tensor mapping a checkpoint keeps under `key` (Lightning's "state_dict", LlamaGen's "model"),
    or at its top level where `key` is None; anything in it that is not a tensor refused in one line."""
    state = payload.get(key) if isinstance(payload, dict) and key is not None else payload
    if not isinstance(state, dict):
        where = f"under {key!r}" if key else "at its top level"
        raise VqtoolError(f"holds no weights {where}", path)
    strange = [name for name, value in state.items() if not isinstance(value, torch.Tensor)]
    if strange:
        raise VqtoolError(f"its weights under {key!r} include {strange[0]!r}, which is not a tensor", path)
    return dict(state)

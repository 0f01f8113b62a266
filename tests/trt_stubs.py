"""Make the published tensorrt-stubs readable by mypy.

tensorrt-stubs 10.13 ships its stubs without a py.typed marker (so mypy skips them) and with a few
syntax errors: plugin methods whose parameter is named `in` (a keyword), one parameter without a
default after defaulted ones, and an import of the runtime-only `tensorrt_libs`. We copy the stubs
and repair exactly those, so mypy checks our TensorRT code against the real API.
"""

from __future__ import annotations

import re
import shutil
from importlib import metadata
from pathlib import Path


def stubs_installed() -> bool:
    try:
        metadata.distribution("tensorrt-stubs")
    except metadata.PackageNotFoundError:
        return False
    return True


def repaired_stubs(target: Path) -> Path:
    """Copy tensorrt/ and tensorrt_bindings/ stubs into `target`, repaired; returns a MYPYPATH entry."""
    dist = metadata.distribution("tensorrt-stubs")
    for package in ("tensorrt", "tensorrt_bindings"):
        shutil.copytree(Path(str(dist.locate_file(package))), target / package)
    bindings = target / "tensorrt_bindings" / "tensorrt.pyi"
    text = re.sub(r"(\(self[^)]*?)\bin: ", r"\1in_: ", bindings.read_text())
    text = text.replace("power: Weights = None, channel_axis: int)", "power: Weights = None, channel_axis: int = ...)")
    bindings.write_text(text)
    init = target / "tensorrt" / "__init__.pyi"
    init.write_text(init.read_text().replace("import tensorrt_libs as tensorrt_libs\n", ""))
    return target

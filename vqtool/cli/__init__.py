"""The `vqtool` command line: thin Typer commands over the library, one module per command group.

Nothing here imports torch at module level: encode/decode run where PyTorch is not installed, and
train/export reach the `train` and `export` packages inside the commands that need them.
"""

from vqtool.cli import training  # noqa: F401, I001  (each module registers its commands, in this order)
from vqtool.cli import importing  # noqa: F401
from vqtool.cli import exporting  # noqa: F401
from vqtool.cli import running  # noqa: F401
from vqtool.cli.common import app

__all__ = ["app", "main"]


def main() -> None:
    app()

"""The `vqtool` command line: thin Typer commands over the library, one module per command group.

Nothing here imports torch at module level: encode/decode run where PyTorch is not installed, and
train/export reach the `train` and `export` packages inside the commands that need them.
"""

import signal  # noqa: I001  (the command modules below are imported in the order they register their commands)

from vqtool.cli import training  # noqa: F401  (each module registers its commands, in this order)
from vqtool.cli import importing  # noqa: F401
from vqtool.cli import exporting  # noqa: F401
from vqtool.cli import running  # noqa: F401
from vqtool.cli.common import app

__all__ = ["app", "main"]


def main() -> None:
    # Past the file-size limit (ulimit -f) a write then fails with an error that is reported in one line, instead
    # of the signal ending the process without a word.
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    app()

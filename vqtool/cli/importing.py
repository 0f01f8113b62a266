"""`vqtool import`: a diffusers or transformers VQ model into a vqtool checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeAlias

import typer

from vqtool.cli.common import OverwriteOption, app, choices, print_result, require_torch, say, user_errors
from vqtool.model.config import QUANTIZERS, SOURCE_FORMATS

if TYPE_CHECKING:  # a choice type is Any to mypy (vqtool.cli.common says why)
    Quantizer: TypeAlias = Any
    SourceFormat: TypeAlias = Any
else:
    Quantizer = choices("Quantizer", QUANTIZERS)  # vqtool.model.config: how an imported model's codes are searched
    SourceFormat = choices("SourceFormat", SOURCE_FORMATS)  # vqtool.model.config: what vqtool import reads


@app.command("import")
@user_errors
def import_command(
    source: Annotated[
        Path,
        typer.Argument(
            help="A local folder in the library's own layout (config.json and safetensors weights, as save_pretrained "
            "writes and a hub snapshot holds), a pipeline folder with the model in a subfolder, or an original "
            "checkpoint: LlamaGen's .pt, a Janus / Janus-Pro folder, a taming / latent-diffusion / Chameleon .ckpt "
            "with its YAML beside it. Nothing outside it is read."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="The checkpoint to write (e.g. movq.pt).")],
    subfolder: Annotated[
        str | None,
        typer.Option(
            help="The pipeline's subfolder holding the model (vqvae, movq, ...); found by itself when there is one."
        ),
    ] = None,
    image_size: Annotated[
        int | None, typer.Option(help="The image side to run at (default: the model's own, from its config).")
    ] = None,
    source_format: Annotated[
        SourceFormat | None,
        typer.Option(
            "--format",
            help="What SOURCE holds: library (a diffusers or transformers folder), llamagen, janus or taming; "
            "recognised from the files when left out.",
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="A taming / latent-diffusion / Chameleon checkpoint's YAML, where it is not beside the checkpoint "
            "(CHECKPOINT.yaml, model.yaml, config.yaml, vqgan.yaml) or in the release folder's configs/.",
        ),
    ] = None,
    quantizer: Annotated[
        Quantizer | None,
        typer.Option(
            help="library: codes as the library's own quantizer picks them; original: as the model's original design "
            "does, where the two differ (transformers' Janus: l2-normalised latents and codes, as LlamaGen). "
            "Default: library for a library's folder, original for an original checkpoint."
        ),
    ] = None,
    allow_pickle: Annotated[
        bool,
        typer.Option(
            "--allow-pickle",
            help="Read pickled weights (.bin, .pt, .ckpt) where there are no safetensors, with PyTorch's weights-only "
            "loader: it builds tensors only and runs no code from the file (every other object in it is left out "
            "unread), but any pickle is a larger surface than safetensors.",
        ),
    ] = False,
    overwrite: OverwriteOption = False,
) -> None:
    """Import a VQ model from diffusers (VQModel), transformers (JanusVQVAE, Emu3VQVAE, ChameleonVQVAE) or an
    original checkpoint (LlamaGen, Janus, taming, latent diffusion, Chameleon) as a vqtool checkpoint."""
    require_torch("import")
    from vqtool.model.importing import import_model

    result = import_model(
        source,
        out,
        subfolder=subfolder,
        image_size=image_size,
        quantizer=quantizer.value if quantizer is not None else None,
        allow_pickle=allow_pickle,
        source_format=source_format.value if source_format is not None else None,
        config_file=config,
        overwrite=overwrite,
        log=say,
    )
    imported = result.config
    print_result(
        f"imported {imported.library} {imported.class_name} from {result.folder}: {imported.codes} codes, "
        f"{imported.image_size}x{imported.image_size} images -> {imported.grid}x{imported.grid} codes\n"
        f"checkpoint: {out}\nnext:       vqtool export {out}"
    )

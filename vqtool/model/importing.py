"""`vqtool import`: a diffusers or transformers VQ model, from a local folder in the library's own layout, into a
vqtool checkpoint that every other command takes like one of vqtool's own. Nothing is downloaded."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vqtool.errors import VqtoolError, first_line
from vqtool.formats.lock import output_lock
from vqtool.formats.outputs import check_new_file
from vqtool.images.embedded import embedded_photographs
from vqtool.model.checkpoint import require_safe_torch_load, save_checkpoint
from vqtool.model.config import LIBRARY_LAYOUT, QUANTIZERS, SOURCE_FORMATS, TAMING, TrainConfig
from vqtool.model.imported import (
    FAMILIES,
    LIBRARIES,
    SIGNED_UNIT,
    DiffusersVQ,
    ImportedConfig,
    ImportedVQ,
    pixel_scaling,
    remap_codes,
)
from vqtool.model.originals import read_original, recognise
from vqtool.model.vqvae import code_distances, l2_normalize

# Where an image processor's settings (rescale factor, mean, std) may lie: the model's folder and, where the model is
# a subfolder of SOURCE (a pipeline, a hub snapshot), SOURCE itself and its image processor subfolder. Never above
# SOURCE: a file the user did not hand over does not change the model's input.
PROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_PLACES = (".", "image_processor")
# Weights vqtool reads without running code from them, and those that are pickles (torch.load).
SAFE_WEIGHTS = ".safetensors"
PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class ImportResult:
    checkpoint: Path
    config: ImportedConfig
    folder: Path  # where the model was read from (SOURCE or its subfolder)
    note: str  # one line on the quantizer, where the library and the original design disagree


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise VqtoolError(f"not a readable {path.name} ({first_line(exc)})", path) from None
    if not isinstance(raw, dict):
        raise VqtoolError(f"{path.name} does not hold an object", path)
    return raw


def _read_config(folder: Path) -> dict[str, Any]:
    return _read_config_file(folder / "config.json")


def _library_of(raw: dict[str, Any], folder: Path) -> tuple[str, str]:
    """(library, class name) of the model a config.json describes: diffusers names it by `_class_name`,
    transformers by `model_type`."""
    named = raw.get("_class_name") or raw.get("model_type")
    for family in FAMILIES.values():
        if named == family.config_type:
            return family.library, family.class_name
    known = ", ".join(f"{family.library} {family.class_name}" for family in FAMILIES.values())
    raise VqtoolError(f"describes {named or 'no model class'}; vqtool imports {known}", folder / "config.json")


def _channels(raw: dict[str, Any], name: str, default: float, path: Path) -> float | list[float]:
    """An image processor's per-channel setting: one number or three, checked."""
    value = raw.get(name, default)
    values = value if isinstance(value, list) else [value]
    if len(values) not in (1, 3) or not all(type(v) in (int, float) for v in values):
        raise VqtoolError(f"'{name}' must be a number or a list of three numbers, got {value!r}", path)
    if name == "image_std" and any(v == 0 for v in values):
        raise VqtoolError("'image_std' must not be 0", path)
    return value if isinstance(value, list) else float(value)


def _processor_scaling(path: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(gain, bias) of a preprocessor_config.json's rescaling and normalisation; a malformed one refused in one line."""
    raw = _read_config_file(path)
    rescale = raw.get("rescale_factor", 1 / 255)
    if type(rescale) not in (int, float) or not rescale > 0:
        raise VqtoolError(f"'rescale_factor' must be a positive number, got {rescale!r}", path)
    normalize = raw.get("do_normalize", True)
    if not isinstance(normalize, bool):
        raise VqtoolError(f"'do_normalize' must be true or false, got {normalize!r}", path)
    if not normalize:
        return pixel_scaling(float(rescale), 0.0, 1.0)
    mean, std = _channels(raw, "image_mean", 0.5, path), _channels(raw, "image_std", 0.5, path)
    return pixel_scaling(float(rescale), mean, std)


def _input_scaling(
    source: Path, folder: Path, family: type[ImportedVQ]
) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """(gain, bias, where from) of the model's input scaling: its image processor's settings where SOURCE holds them
    (beside the model, or for a model in a subfolder, in SOURCE or its image_processor folder), else the family's
    own processor defaults."""
    places = [folder] + ([source / place for place in PROCESSOR_PLACES] if folder != source else [])
    for place in places:
        path = place / PROCESSOR_FILE
        if path.is_file():
            gain, bias = _processor_scaling(path)
            return gain, bias, str(path)
    return (*family.scaling, f"{family.class_name}'s image processor defaults")


def _weights_check(folder: Path, allow_pickle: bool) -> bool:
    """Whether the library should read safetensors (True) or, where only pickled weights exist and the user allowed
    them, those (False, each checked first to load with weights_only=True); else the one-line refusal."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    if any(p.name.endswith(SAFE_WEIGHTS) for p in files):
        return True
    pickled = [p for p in files if p.suffix in PICKLED_WEIGHTS]
    if not pickled:
        raise VqtoolError("holds no .safetensors weights", folder)
    if not allow_pickle:
        raise VqtoolError(
            f"holds pickled weights ({pickled[0].name}) and no .safetensors; a pickle can run code as it is read, so "
            "vqtool import reads safetensors only: convert the weights, or pass --allow-pickle to read them with "
            "torch.load(weights_only=True)",
            folder,
        )
    require_safe_torch_load()
    for path in pickled:
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # the weights-only unpickler's refusal, or a damaged file
            raise VqtoolError(f"cannot be read as weights alone ({first_line(exc)})", path) from None
    return False


def find_model_folder(source: Path, subfolder: str | None) -> Path:
    """SOURCE itself, its --subfolder, or in a pipeline folder the one subfolder holding an importable model."""
    if not source.is_dir():
        raise VqtoolError("no such folder (vqtool import reads a local folder; nothing is downloaded)", source)
    if subfolder is not None:
        folder = source / subfolder
        if not (folder / "config.json").is_file():
            raise VqtoolError(f"no config.json in its subfolder {subfolder!r}", source)
        return folder
    if (source / "config.json").is_file():
        return source
    found = []
    for child in sorted(p for p in source.iterdir() if (p / "config.json").is_file()):
        try:
            _library_of(_read_config(child), child)
        except VqtoolError:
            continue
        found.append(child)
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        raise VqtoolError(f"holds no config.json; pass --subfolder (importable subfolders: {names})", source)
    return found[0]


def _load_library_model(library: str, class_name: str, folder: Path, safetensors: bool) -> Any:
    try:
        model = LIBRARIES[library].load(class_name, folder, safetensors=safetensors)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, RecursionError) as exc:
        raise VqtoolError(f"{library} cannot load this {class_name} ({first_line(exc)})", folder) from None
    return model.float().eval()


def _rounded(values: tuple[float, ...]) -> str:
    """A channel triple as a short list, one number where all three agree."""
    shown = [f"{v:.6g}" for v in values]
    return shown[0] if len(set(shown)) == 1 else f"({', '.join(shown)})"


@torch.no_grad()
def _downsample(model: ImportedVQ, size: int) -> int:
    """Image side / code-grid side, as the encoder really gives it."""
    side = int(model.encoder_body()(torch.zeros(1, 3, size, size)).shape[1])
    if side < 1 or size % side:
        raise VqtoolError(f"the encoder turns {size}x{size} images into a {side}-wide grid; pick another --image-size")
    return size // side


@torch.no_grad()
def _photo_latents(model: ImportedVQ) -> torch.Tensor:
    """The encoder's latents of the embedded photographs at the model's size (N x h x w x D)."""
    images = torch.from_numpy(np.ascontiguousarray(embedded_photographs(model.config.image_size)))
    # A few at a time: at a published model's size one image's activations take tens of megabytes.
    return torch.cat([model.encoder_body()(model.model_input(images[s : s + 4])) for s in range(0, len(images), 4)])


@torch.no_grad()
def _quantizer_disagreement(model: ImportedVQ) -> tuple[int, int]:
    """(codes that differ, codes) between the library's quantizer and the original design's, on the embedded
    photographs at the model's size."""
    latents = _photo_latents(model)
    library = model.library_codes(latents)
    book = l2_normalize(model.embedding())
    original = torch.argmin(code_distances(l2_normalize(latents), book), dim=-1)
    return int((library != original).sum()), int(library.numel())


def import_model(
    source: Path,
    out: Path,
    *,
    subfolder: str | None = None,
    image_size: int | None = None,
    quantizer: str | None = None,
    allow_pickle: bool = False,
    source_format: str | None = None,
    config_file: Path | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> ImportResult:
    """Read a VQ model from SOURCE and write it to `out` as a vqtool checkpoint: a diffusers or transformers folder,
    or an original checkpoint (`source_format` llamagen, janus or taming; recognised from the files where None).

    Weights are read from safetensors, or with `allow_pickle` from pickles, of which only the tensors are read. The
    quantizer is the original design's for an original checkpoint and the library's for a library's folder unless
    `quantizer` says otherwise. An existing `out` is replaced only with `overwrite`, and no other run may write it
    meanwhile."""
    if quantizer is not None and quantizer not in QUANTIZERS:
        raise VqtoolError(f"--quantizer takes {' or '.join(QUANTIZERS)}, got {quantizer!r}")
    if source_format is not None and source_format not in SOURCE_FORMATS:
        raise VqtoolError(f"--format takes {', '.join(SOURCE_FORMATS)}, got {source_format!r}")
    with output_lock(out):
        check_new_file(out, overwrite=overwrite)
        fmt = source_format or recognise(source) or LIBRARY_LAYOUT
        if config_file is not None and fmt != TAMING:
            raise VqtoolError(f"--config names a taming checkpoint's YAML; {source} is read as {fmt}")
        if fmt == LIBRARY_LAYOUT:
            loaded = _from_library(source, subfolder, image_size, quantizer or "library", allow_pickle)
        else:
            loaded = _from_original(source, fmt, config_file, image_size, quantizer, allow_pickle)
        return _finish(loaded, out, log)


@dataclass(frozen=True)
class _Loaded:
    """A library model ready to import: its family, the model with its weights, where it came from, and how its
    inputs are scaled and its codes searched."""

    family: type[ImportedVQ]
    model: Any
    folder: Path
    quantizer: str
    gain: tuple[float, ...]
    bias: tuple[float, ...]
    scaling_from: str
    image_size: int | None  # asked for, or an original's published size; None: the library configuration's
    described: str
    original: bool = False  # an original checkpoint, renamed into the library's class (its reading is told)
    used_codes: int | None = None  # taming's remap: the codebook rows in use


def _check_quantizer(family: type[ImportedVQ], quantizer: str, where: Path) -> None:
    if quantizer not in family.quantizers:
        raise VqtoolError(
            f"--quantizer {quantizer} applies to {family.class_name} only where its library and its "
            f"original design search codes differently; {family.class_name} has one quantizer",
            where,
        )


def _from_library(
    source: Path, subfolder: str | None, image_size: int | None, quantizer: str, allow_pickle: bool
) -> _Loaded:
    folder = find_model_folder(source, subfolder)
    library, class_name = _library_of(_read_config(folder), folder)
    family = FAMILIES[(library, class_name)]
    _check_quantizer(family, quantizer, folder)
    gain, bias, scaling_from = _input_scaling(source, folder, family)  # a malformed one stops the import before loading
    model = _load_library_model(library, class_name, folder, _weights_check(folder, allow_pickle))
    return _Loaded(family, model, folder, quantizer, gain, bias, scaling_from, image_size, f"{library} {class_name}")


def _from_original(
    source: Path, fmt: str, config_file: Path | None, image_size: int | None, quantizer: str | None, allow_pickle: bool
) -> _Loaded:
    original = read_original(source, fmt, config_file=config_file, image_size=image_size, allow_pickle=allow_pickle)
    family = FAMILIES[(original.library, original.class_name)]
    chosen = quantizer or original.quantizer
    _check_quantizer(family, chosen, source)
    model = LIBRARIES[original.library].build(original.class_name, original.config)
    if original.used_codes is not None:
        remap_codes(model.quantize, original.used_codes)  # before the weights: they hold its table of rows in use
    _load_weights(model, original.state, f"the {fmt} design they were read as", source)
    gain, bias = SIGNED_UNIT
    return _Loaded(
        family,
        model.float().eval(),
        source,
        chosen,
        gain,
        bias,
        f"{fmt}'s own preprocessing",
        original.image_size,
        f"{original.described}, run by {original.library} {original.class_name}",
        original=True,
        used_codes=original.used_codes,
    )


def _load_weights(model: Any, state: dict[str, torch.Tensor], design: str, source: Path) -> None:
    """Every weight of `model` from `state`, and nothing else; a missing, extra or misshapen one refused by name."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    misshapen = [k for k in own if k in state and own[k].shape != state[k].shape]
    for problem, names in (("lacks", missing), ("holds an unknown", extra), ("has a misshapen", misshapen)):
        if names:
            shapes = (
                f" {tuple(state[names[0]].shape)}, expected {tuple(own[names[0]].shape)}" if names is misshapen else ""
            )
            raise VqtoolError(f"{problem} weight {names[0]}{shapes} ({len(names)} such): not {design}", source)
    model.load_state_dict(state, strict=True)


def _finish(loaded: _Loaded, out: Path, log: Callable[[str], None]) -> ImportResult:
    family, library_model = loaded.family, loaded.model
    library, class_name = family.library, family.class_name
    # Plain JSON values: a checkpoint is read with weights_only, which unpickles no library's config classes.
    own = library_model.config
    config = json.loads(json.dumps(own.to_dict() if hasattr(own, "to_dict") else dict(own)))
    size = loaded.image_size or family.native_size(config)
    version = LIBRARIES[library].version()
    decoder = family.implements_decoder
    gain, bias, quantizer = loaded.gain, loaded.bias, loaded.quantizer
    draft = ImportedConfig(
        library, class_name, version, config, size, 1, 0, quantizer, gain, bias, decoder, used_codes=loaded.used_codes
    )
    model = family(draft, library_model)  # the loaded model itself, weights and all
    codes = int(model.embedding().shape[0])
    imported = replace(draft, downsample=_downsample(model, size), codes=codes)
    model.config = imported
    if loaded.original:
        log(f"read: {loaded.described}")
    if isinstance(model, DiffusersVQ) and model.remapped:
        latents = _photo_latents(model)
        outside = model.outside_rows_in_use(latents)
        log(
            f"remap: codes are positions among the {imported.codes} codebook rows in use; {outside} of "
            f"{latents.shape[:3].numel()} latents of the embedded photographs lie nearest a row not in use, which "
            "the original gives a random id and vqtool the nearest row in use"
        )
    log(f"input: pixel x {_rounded(gain)} + {_rounded(bias)} per channel ({loaded.scaling_from})")
    note = ""
    if len(family.quantizers) > 1:
        differ, total = _quantizer_disagreement(model)
        other = "original" if quantizer == "library" else "library"
        how = "raw vectors, as transformers does" if quantizer == "library" else "l2-normalised, as LlamaGen does"
        # With codes of unit length the two searches agree (|z - e|^2 = |z|^2 + 1 - 2 z.e ranks codes as z.e
        # does): how far the stored codes are from it says why they differ.
        norms = model.embedding().detach().norm(dim=-1)
        note = (
            f"quantizer: {quantizer} ({how}); the {other} one gives {differ} of {total} codes differently on "
            f"the embedded photographs (stored code lengths {norms.min():.3g} to {norms.max():.3g})"
        )
        log(note)
    out.parent.mkdir(parents=True, exist_ok=True)
    extra = {"imported_from": str(loaded.folder), "read_as": loaded.described}
    save_checkpoint(out, model, TrainConfig(), step=0, epoch=0, data=None, extra=extra)
    return ImportResult(out, imported, loaded.folder, note)

"""What a run may replace, checked before it writes anything: vqtool never overwrites or deletes what it did not write.

- An output that exists is replaced only with `--overwrite` (or continued with `--resume`).
- A file vqtool derives from an output's name (the codes sidecar) is replaced only where vqtool wrote it.
- A folder is written into only where it is empty or vqtool's own (an export, a decode), and replacing it removes
  only what vqtool's record of it lists: the export's manifest, the decode's list of the files it wrote.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

from vqtool.errors import VqtoolError
from vqtool.formats.atomic import write_json
from vqtool.formats.codes import SIDECAR_FORMAT, sidecar_path
from vqtool.formats.codes_parquet import is_parquet
from vqtool.formats.manifest import (
    BENCH_FORMAT,
    BENCH_NAME,
    FORMAT,
    MANIFEST_NAME,
    ORT_TRT_CACHE,
    PARITY_NAME,
    engine_path,
)
from vqtool.formats.records import read_json_object

CODES_SUFFIXES = (".npy", ".parquet")
OVERWRITE_HINT = "pass --overwrite to replace it, or choose another output"


def _present(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def check_new_file(out: Path, *, overwrite: bool) -> None:
    """A file output: refused where it is a folder, or where it exists and `overwrite` was not given."""
    if out.is_dir():
        raise VqtoolError("is a folder; name the file to write", out)
    if _present(out) and not overwrite:
        raise VqtoolError(f"exists; {OVERWRITE_HINT}", out)


def check_bench_output(out: Path) -> None:
    """`vqtool bench --out`: a new file, or an earlier bench record of vqtool's, which it replaces."""
    if out.is_dir():
        raise VqtoolError("is a folder; name the file to write", out)
    if _present(out) and (out.is_symlink() or not _is_bench_record(out)):
        raise VqtoolError(
            "is not a bench record written by vqtool, and bench would replace it; move it, or name another --out", out
        )


def _is_bench_record(path: Path) -> bool:
    """A bench.json: with its `format`, or, written before bench.json had one, its `cpu` and `model_only` rows."""
    raw = read_json_object(path)
    return raw.get("format") == BENCH_FORMAT or (
        "format" not in raw and "cpu" in raw and isinstance(raw.get("model_only"), list)
    )


def _json_format(path: Path) -> object:
    """The `format` field of a JSON file, or None where it is not JSON holding an object."""
    return read_json_object(path).get("format")


def check_codes_name(out: Path) -> None:
    """A codes output is named .npy or .parquet: checked before any other name (a sidecar's, a lock's) is made from
    it."""
    if out.suffix.lower() not in CODES_SUFFIXES:
        raise VqtoolError("codes are written as .npy (with a .json sidecar beside it) or .parquet; name it so", out)


def check_codes_output(out: Path, *, overwrite: bool, resuming: bool) -> None:
    """A codes output (.npy with its sidecar, or .parquet): what `vqtool encode` and `merge` may write, checked before
    any work. `resuming`: an interrupted run of the same output is being continued, which replaces it as it ends."""
    check_codes_name(out)
    if resuming:
        check_new_file(out, overwrite=True)
    else:
        check_new_file(out, overwrite=overwrite)
    if is_parquet(out):
        return
    sidecar = sidecar_path(out)
    if _present(sidecar) and (sidecar.is_symlink() or _json_format(sidecar) != SIDECAR_FORMAT):
        raise VqtoolError(
            f"is not a codes sidecar written by vqtool, and {out.name}'s would replace it; move it or name the "
            "output otherwise",
            sidecar,
        )


# ---- decode folders ----------------------------------------------------------------------------------------------

DECODE_RECORD = ".vqtool-decode.json"
DECODE_FORMAT = "vqtool.decode"


def _recorded_names(out_dir: Path) -> set[str]:
    record = out_dir / DECODE_RECORD
    raw = read_json_object(record)
    if raw.get("format") != DECODE_FORMAT or not isinstance(raw.get("files"), list):
        return set()
    return {name for name in raw["files"] if isinstance(name, str) and os.path.basename(name) == name}


def _record_decode(out_dir: Path, names: Iterable[str]) -> None:
    write_json(out_dir / DECODE_RECORD, {"format": DECODE_FORMAT, "files": sorted(names)})


def claim_decode_folder(out_dir: Path, names: Sequence[str], *, overwrite: bool) -> set[str]:
    """Check that a decode may write `names` into `out_dir`, and record them there before any is written; returns
    the files an earlier decode wrote that this one will not, to remove once it is done."""
    if _present(out_dir) and not out_dir.is_dir():
        raise VqtoolError("exists and is not a folder", out_dir)
    others = [p for p in out_dir.iterdir() if p.name != DECODE_RECORD] if out_dir.is_dir() else []
    if others and not overwrite:
        raise VqtoolError(
            "is not empty; pass --overwrite to decode into it (vqtool then removes only the files an earlier decode "
            "wrote there), or choose another folder",
            out_dir,
        )
    earlier = _recorded_names(out_dir) if out_dir.is_dir() else set()
    # --overwrite replaces what vqtool wrote there, never a file of the user's that happens to share a name.
    present = {p.name for p in others}
    theirs = next((name for name in names if name in present and name not in earlier), None)
    if theirs is not None:
        raise VqtoolError(
            "was not written by an earlier decode there, and this decode would replace it; move it, or choose "
            "another folder",
            out_dir / theirs,
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    # Recorded first, so that a decode that dies part way still lists what it may have written.
    _record_decode(out_dir, earlier | set(names))
    return earlier - set(names)


def finish_decode_folder(out_dir: Path, names: Sequence[str], stale: Iterable[str]) -> None:
    """Remove the files an earlier decode wrote and this one did not, and record what the folder now holds."""
    for name in stale:
        path = out_dir / name
        if path.is_file() and not path.is_symlink():
            path.unlink()
    _record_decode(out_dir, names)


# ---- export folders ----------------------------------------------------------------------------------------------


def export_files(folder: Path) -> set[str] | None:
    """The files of the vqtool export in `folder`, as its manifest lists them (graphs, the PyTorch file, the engines
    built from its graphs, the records vqtool keeps there), or None where `folder` holds no vqtool manifest."""
    manifest = folder / MANIFEST_NAME
    raw = read_json_object(manifest)
    if raw.get("format") != FORMAT:
        return None
    names = {MANIFEST_NAME, PARITY_NAME, BENCH_NAME, ORT_TRT_CACHE}
    if isinstance(raw.get("pytorch_file"), str) and raw["pytorch_file"]:
        names.add(raw["pytorch_file"])
    graphs = raw.get("graphs")
    for key, entry in graphs.items() if isinstance(graphs, dict) else ():
        if isinstance(entry, dict) and isinstance(entry.get("file"), str):
            names.add(entry["file"])
        with contextlib.suppress(VqtoolError):
            role, _, precision = key.partition(".")
            engine = engine_path(folder, role, precision or "fp32").name
            names |= {engine, f"{engine}.json"}
    if any(os.path.basename(name) != name or name in ("", ".", "..") for name in names):
        return None  # a manifest that names files outside its folder is nobody's export
    return names


def check_export_target(out_dir: Path, *, overwrite: bool) -> None:
    """An export may go where nothing is, into an empty folder, or, with `overwrite`, over an earlier export."""
    if not _present(out_dir):
        return
    if not out_dir.is_dir():
        raise VqtoolError("exists and is not a folder; choose another --out", out_dir)
    if not any(out_dir.iterdir()):
        return
    if export_files(out_dir) is None:
        raise VqtoolError("is not empty and holds no vqtool export; choose another --out", out_dir)
    if not overwrite:
        raise VqtoolError(
            "holds an export; pass --overwrite to replace it (only the files its manifest lists), or choose "
            "another --out",
            out_dir,
        )


def _remove_own(path: Path) -> None:
    """Remove a file (or the engine cache folder) an export wrote; a link goes, never what it points at."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def remove_export(folder: Path) -> bool:
    """Remove the files the export in `folder` consists of, and the folder if nothing else is left in it; returns
    whether the folder is gone. Files vqtool did not write stay."""
    listed = export_files(folder)
    if listed is None:
        return False
    for name in listed - {MANIFEST_NAME}:
        _remove_own(folder / name)
    (folder / MANIFEST_NAME).unlink(missing_ok=True)  # last: until then the folder still says what it holds
    with contextlib.suppress(OSError):
        folder.rmdir()
    return not folder.exists()


def replace_export(staging: Path, out_dir: Path) -> None:
    """Put the export in `staging` at `out_dir`, over whatever export is there (checked by check_export_target).

    Into an empty place, one rename. Over an earlier export, file by file with its manifest last: a reader of the
    old manifest meanwhile meets a graph whose checksum is not the one it lists, an error rather than a mix; then
    the earlier export's files that the new one does not have are removed. Other files in the folder stay."""
    if not _present(out_dir) or (out_dir.is_dir() and not any(out_dir.iterdir())):
        if out_dir.is_dir():
            out_dir.rmdir()
        staging.rename(out_dir)
        return
    earlier = export_files(out_dir) or set()
    written = {p.name for p in staging.iterdir()}
    theirs = next((name for name in sorted(written - earlier) if _present(out_dir / name)), None)
    if theirs is not None:  # nothing replaced yet: the earlier export stands, and the user's file with it
        raise VqtoolError(
            "is not part of the export there, and this export writes a file of that name; move it, or choose "
            "another --out",
            out_dir / theirs,
        )
    for name in sorted(written - {MANIFEST_NAME}):
        if (out_dir / name).is_dir():
            _remove_own(out_dir / name)  # the earlier export's engine cache: a folder no rename replaces
        os.replace(staging / name, out_dir / name)
    os.replace(staging / MANIFEST_NAME, out_dir / MANIFEST_NAME)
    for name in earlier - written:
        _remove_own(out_dir / name)
    staging.rmdir()

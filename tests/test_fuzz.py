"""Damaged and hostile input, seeded: every file is read, refused in one line, or skipped with --skip-bad.

Images (PNG, JPEG, WebP, BMP damaged in every way tests/damaged.py knows), codes files, sidecars,
manifests, checkpoints and the options themselves. Zero tracebacks and no partial output anywhere.
"""

from __future__ import annotations

import json
import pickle
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import one_error_line, run_cli
from tests.damaged import write_damaged_corpus
from vqtool.data import as_image_set
from vqtool.errors import VqtoolError
from vqtool.formats.codes import read_codes, read_sidecar, sidecar_path
from vqtool.formats.manifest import MANIFEST_NAME, read_manifest
from vqtool.images.reading import read_rgb
from vqtool.pipeline.encode import EncodeInterrupted, EncodeOptions, EncodeResult, plan_encode, run_encode
from vqtool.runtime.onnxruntime import OnnxRuntimeRunner


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("damaged").joinpath("images")


@pytest.fixture(scope="module")
def damaged(corpus: Path) -> list[Path]:
    return write_damaged_corpus(corpus, seed=0)


@pytest.fixture(scope="module")
def verdicts(damaged: list[Path]) -> dict[Path, str | None]:
    """Each file -> None if read_rgb reads it, else its one-line error; anything else fails here."""
    out: dict[Path, str | None] = {}
    for path in damaged:
        try:
            pixels = read_rgb(path)
        except VqtoolError as error:
            out[path] = str(error)
        else:
            assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3, path
            out[path] = None
    return out


def test_plain_pillow_fails_on_the_corpus_in_ways_a_narrow_except_misses(damaged: list[Path]) -> None:
    """The fault bites: Pillow raises exceptions outside OSError/ValueError (the bomb error among them)."""
    raised = set()
    for path in damaged:
        try:
            with Image.open(path) as image:
                image.load()
        except Exception as exc:  # noqa: BLE001 - collecting what Pillow raises is the point
            raised.add(type(exc))
    assert Image.DecompressionBombError in raised
    assert not all(issubclass(kind, (OSError, ValueError)) for kind in raised)


def test_every_damaged_image_is_read_or_refused_in_one_line(verdicts: dict[Path, str | None]) -> None:
    refused = {path: error for path, error in verdicts.items() if error is not None}
    assert len(verdicts) >= 140 and len(refused) >= 100 and len(verdicts) - len(refused) >= 10
    for path, error in refused.items():
        assert error.startswith(f"{path}: ") and "\n" not in error, error
    for path, error in refused.items():
        if path.name.startswith("huge-header") and path.suffix in (".png", ".bmp", ".jpg"):
            assert "--max-pixels" in error, error
    readable = {path.name for path, error in verdicts.items() if error is None}
    assert {p for p in readable if p.startswith("wrong-extension")} == {
        f"wrong-extension-{ext}.{other}"
        for ext, other in (("png", "jpg"), ("jpg", "png"), ("webp", "png"), ("bmp", "png"))
    }


def test_max_pixels_refuses_from_the_header_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.damaged import _png_with_size
    from vqtool.images.reading import allow_pixels

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 120, 3), dtype=np.uint8))
    for name in ("a.png", "a.jpg", "a.webp", "a.bmp"):
        image.save(tmp_path / name)
        assert read_rgb(tmp_path / name, max_pixels=120 * 100).shape == (100, 120, 3)
        with pytest.raises(VqtoolError, match=r"120x100 = 12,000 pixels, more than --max-pixels 11,999"):
            read_rgb(tmp_path / name, max_pixels=120 * 100 - 1)
        if name.endswith(".webp"):
            continue  # libwebp's demuxer checks the whole container at open; pixels still decode after the check
        # Cut short, the file would fail to decode; the size check speaks first, so nothing was decoded.
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut-{name}").write_bytes(data[: len(data) * 2 // 3])
        with pytest.raises(VqtoolError, match="more than --max-pixels"):
            read_rgb(tmp_path / f"cut-{name}", max_pixels=100)
    # A limit above Pillow's own (twice its warning threshold) is honoured, not overruled by Pillow.
    (tmp_path / "bomb.png").write_bytes(_png_with_size((tmp_path / "a.png").read_bytes(), 20_000, 20_000, True))
    with pytest.raises(VqtoolError, match="more than --max-pixels"):
        read_rgb(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    allow_pixels(500_000_000)
    with pytest.raises(VqtoolError) as raised:
        read_rgb(tmp_path / "bomb.png", max_pixels=500_000_000)
    assert "max-pixels" not in str(raised.value)  # got past the size checks, then failed to decode the data


def _outputs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_encode_stops_at_the_first_bad_file_or_skips_and_reports_them(
    export_dir: Path, corpus: Path, verdicts: dict[Path, str | None], tmp_path: Path
) -> None:
    out = tmp_path / "out" / "codes.npy"
    out.parent.mkdir()
    stopped = run_cli("encode", str(corpus), "--model", str(export_dir), "--out", str(out))
    first_bad = min((p for p, e in verdicts.items() if e), key=lambda p: p.as_posix())
    one_error_line(stopped, str(first_bad))
    assert _outputs(out.parent) == []

    skipped = run_cli("encode", str(corpus), "--model", str(export_dir), "--out", str(out), "--skip-bad")
    assert skipped.returncode == 0, skipped.stderr
    assert "Traceback" not in skipped.stderr
    refused = sorted(str(p) for p, e in verdicts.items() if e)
    read = sorted(str(p) for p, e in verdicts.items() if e is None)
    assert f"skipped {len(refused)} of {len(verdicts)} files" in skipped.stderr
    sidecar = json.loads(sidecar_path(out).read_text())
    assert sidecar["files"] == read and np.load(out).shape[0] == len(read)
    assert [entry["file"] for entry in sidecar["skipped"]] == refused
    reasons = {entry["file"]: entry["reason"] for entry in sidecar["skipped"]}
    assert all(verdicts[Path(f)] == f"{f}: {reason}" for f, reason in reasons.items())
    assert _outputs(out.parent) == ["codes.json", "codes.npy"]
    # The rows are the codes of the files read, in order: the same as encoding those files alone.
    alone = tmp_path / "alone.npy"
    assert run_cli("encode", *read, "--model", str(export_dir), "--out", str(alone)).returncode == 0
    assert np.array_equal(np.load(alone), np.load(out))


def test_skip_bad_shards_merge_into_the_single_pass(export_dir: Path, corpus: Path, tmp_path: Path) -> None:
    single = tmp_path / "single.npy"
    common = ("--model", str(export_dir), "--skip-bad", "--batch-size", "16")
    assert run_cli("encode", str(corpus), "--out", str(single), *common).returncode == 0
    parts = []
    for index in range(3):
        part = tmp_path / f"part{index}.npy"
        result = run_cli("encode", str(corpus), "--out", str(part), "--shard", f"{index}/3", *common)
        assert result.returncode == 0, result.stderr
        parts.append(str(part))
    merged = tmp_path / "merged.npy"
    result = run_cli("merge", *reversed(parts), "--out", str(merged))
    assert result.returncode == 0, result.stderr
    assert merged.read_bytes() == single.read_bytes()
    assert sidecar_path(merged).read_bytes() == sidecar_path(single).read_bytes()
    assert json.loads(sidecar_path(merged).read_text())["skipped"]


class _StopAfter:
    """An encoder that is interrupted (as by Ctrl-C) after `calls` batches."""

    def __init__(self, runner: OnnxRuntimeRunner, calls: int) -> None:
        self.runner, self.calls = runner, calls
        self.backend, self.provider = runner.backend, runner.provider

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self.calls == 0:
            raise KeyboardInterrupt
        self.calls -= 1
        return self.runner(batch)

    def describe(self) -> str:
        return self.runner.describe()


def encode_files(files: Any, manifest: Any, export_dir: Path, encoder: Any, out: Path, **options: Any) -> EncodeResult:
    """The library's encode of a file list (plan, then run) with the given encoder in place of a tokenizer's."""
    resume, log = options.pop("resume", False), options.pop("log")
    plan = plan_encode(as_image_set(files), manifest, export_dir, out, EncodeOptions.of(**options))
    return run_encode(plan, encoder, resume=resume, log=log)


def test_skip_bad_resumes_to_the_uninterrupted_result(export_dir: Path, damaged: list[Path], tmp_path: Path) -> None:
    manifest = read_manifest(export_dir)
    runner = OnnxRuntimeRunner(export_dir / "encoder.onnx", "cpu")
    files = sorted(str(p) for p in damaged)
    kwargs = {"batch_size": 8, "readers": 1, "skip_bad": True, "log": lambda _: None}
    whole = encode_files(files, manifest, export_dir, runner, tmp_path / "whole.npy", **kwargs)
    out = tmp_path / "resumed.npy"
    with pytest.raises(EncodeInterrupted):
        encode_files(files, manifest, export_dir, _StopAfter(runner, 3), out, **kwargs)
    assert not out.exists()
    resumed = encode_files(files, manifest, export_dir, runner, out, resume=True, **kwargs)
    assert resumed.resumed_from > 0 and resumed.count == whole.count
    assert out.read_bytes() == (tmp_path / "whole.npy").read_bytes()
    assert json.loads(sidecar_path(out).read_text()) == json.loads(sidecar_path(tmp_path / "whole.npy").read_text())


# Slow: tests/test_streaming.py's bad-file test covers the same stop-or-skip path through the command, on one file.
@pytest.mark.slow
def test_train_skips_bad_files_only_when_asked(corpus: Path, verdicts: dict[Path, str | None], tmp_path: Path) -> None:
    """Training reads the corpus while it runs: the held-out validation files before the first step, training
    files as batches take them. The first unreadable file met stops the run in one line; with --skip-bad
    every unreadable file met is left out, reported and recorded, and none of the readable ones."""
    refused = {p for p, e in verdicts.items() if e}
    common = ("--data", str(corpus), "--steps", "4", "--batch-size", "8", "--device", "cpu")
    stopped = run_cli("train", *common, "--out", str(tmp_path / "stopped"))
    line = one_error_line(stopped)
    assert any(line.startswith(f"error: {p}:") for p in refused), line
    assert not (tmp_path / "stopped" / "checkpoint.pt").exists()
    trained = run_cli("train", *common, "--skip-bad", "--out", str(tmp_path / "run"))
    assert trained.returncode == 0, trained.stderr
    assert "validation skipped" in trained.stderr and "training skipped" in trained.stderr
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    skipped = {Path(s["file"]) for s in saved["extra"]["skipped"]}
    assert skipped and skipped <= refused
    final = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["skipped_files"] == len(skipped)
    exported = run_cli("export", str(tmp_path / "run" / "checkpoint.pt"), "--out", str(tmp_path / "model"))
    assert "Traceback" not in exported.stderr and (tmp_path / "model" / "encoder.onnx").is_file(), exported.stderr


# ---- The other files users hand us -------------------------------------------------------------------------------


def _bad_codes(folder: Path) -> Iterator[Path]:
    """Codes files that must each be refused: wrong dtypes, values, shapes, pickles, truncations, not .npy."""
    good = np.zeros((3, 2, 2), dtype=np.uint8)
    arrays = {
        "float": good.astype(np.float32),
        "negative": good.astype(np.int16) - 1,
        "too-large": good.astype(np.int32) + 100_000,
        "object": np.array([{"a": 1}, None], dtype=object),
        "bool": good.astype(bool),
        "one-dimensional": np.zeros(4, np.uint8),
        "four-dimensional": np.zeros((1, 1, 2, 2), np.uint8),
        "empty": np.zeros((0, 2, 2), np.uint8),
        "zero-width": np.zeros((3, 2, 0), np.uint8),
    }
    for name, array in arrays.items():
        path = folder / f"{name}.npy"
        np.save(path, array, allow_pickle=True)
        yield path
    data = (folder / "float.npy").read_bytes()
    np.save(folder / "good.npy", good)
    whole = (folder / "good.npy").read_bytes()
    for cut in range(0, len(whole) - 1, 9):
        (folder / f"cut{cut}.npy").write_bytes(whole[:cut])
        yield folder / f"cut{cut}.npy"
    (folder / "text.npy").write_text("not numpy")
    (folder / "pickle.npy").write_bytes(pickle.dumps(good))
    (folder / "header.npy").write_bytes(data[:10] + b"{'descr': 5}" + data[22:])
    yield from (folder / "text.npy", folder / "pickle.npy", folder / "header.npy", folder / "missing.npy", folder)


def test_bad_codes_files_are_refused_in_one_line(export_dir: Path, tmp_path: Path) -> None:
    manifest = read_manifest(export_dir)
    bad = list(_bad_codes(tmp_path))
    assert len(bad) > 20
    for path in bad:
        with pytest.raises(VqtoolError) as refused:
            read_codes(path, manifest)
        assert str(refused.value).startswith(str(path)) and "\n" not in str(refused.value), path
    # Through the command: the pickled (object) codes, refused before an output folder is made.
    result = run_cli("decode", str(tmp_path / "object.npy"), "--model", str(export_dir), "--out", str(tmp_path / "o"))
    one_error_line(result, "object.npy")
    assert not (tmp_path / "o").exists()


def _json_variants(raw: dict[str, object], rng: np.random.Generator) -> Iterator[str]:
    """Truncations, wrong types for every field, missing fields, and things that are not objects."""
    text = json.dumps(raw)
    for cut in sorted(set(rng.integers(0, len(text), 40).tolist())):
        yield text[:cut]
    for key in raw:
        for wrong in (None, "x", -1, 1.5, [], {}, [1, "a"], True):
            yield json.dumps({**raw, key: wrong})
        yield json.dumps({k: v for k, v in raw.items() if k != key})
    yield from ("[]", "null", '"text"', "1", "\x00\xff", "{" * 5000)


def test_broken_sidecars_are_refused_in_one_line(export_dir: Path, mixed_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "codes.npy"
    assert run_cli("encode", str(mixed_folder), "--model", str(export_dir), "--out", str(out)).returncode == 0
    raw = json.loads(sidecar_path(out).read_text())
    manifest = read_manifest(export_dir)
    refused = 0
    for variant in _json_variants(raw, np.random.default_rng(1)):
        sidecar_path(out).write_text(variant, errors="surrogateescape")
        try:
            read_sidecar(out)
            read_codes(out, manifest)
        except VqtoolError as error:
            assert "\n" not in str(error)
            refused += 1
    assert refused > 100
    sidecar_path(out).write_text(json.dumps({**raw, "files": 7}))
    one_error_line(run_cli("decode", str(out), "--model", str(export_dir), "--out", str(tmp_path / "o")), "codes.json")


def test_broken_manifests_are_refused_in_one_line(export_dir: Path, mixed_folder: Path, tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(export_dir, copy)
    raw = json.loads((copy / MANIFEST_NAME).read_text())
    refused = 0
    for variant in [*_json_variants(raw, np.random.default_rng(2)), json.dumps({**raw, "graphs": {"encoder": 1}})]:
        (copy / MANIFEST_NAME).write_text(variant, errors="surrogateescape")
        try:
            read_manifest(copy)
        except VqtoolError as error:
            assert str(error).startswith(str(copy)) and "\n" not in str(error)
            refused += 1
    assert refused > 100
    (copy / MANIFEST_NAME).write_text(json.dumps({**raw, "graphs": []}))
    result = run_cli("encode", str(mixed_folder), "--model", str(copy), "--out", str(tmp_path / "c.npy"))
    one_error_line(result, "manifest.json")


PWNED = Path(tempfile.gettempdir(), "vqtool-pwned")


class _RunsCode:
    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (PWNED,))


def test_a_checkpoint_that_carries_code_is_refused_by_every_command(tmp_path: Path) -> None:
    marker = PWNED
    marker.unlink(missing_ok=True)
    evil = tmp_path / "evil.pt"
    torch.save({"format": "vqtool.checkpoint", "model": _RunsCode()}, evil, pickle_module=pickle)
    with open(evil, "rb") as handle:  # the fault bites: plain unpickling runs the code
        torch.load(handle, weights_only=False)
    assert marker.exists()
    marker.unlink()
    one_error_line(run_cli("export", str(evil), "--out", str(tmp_path / "model")), "evil.pt")
    model = tmp_path / "run"
    model.mkdir()
    shutil.copy(evil, model / "checkpoint.pt")
    one_error_line(run_cli("train", "--resume", str(model), "--steps", "1"), "checkpoint.pt")
    assert not marker.exists() and not (tmp_path / "model").exists()


# ---- The options themselves --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("encode", "{images}", "--batch-size", "0"), "--batch-size must be at least 1"),
        (("encode", "{images}", "--max-pixels", "0"), "--max-pixels must be at least 1"),
        (("encode", "{images}", "--readers", "0"), "--readers must be at least 1"),
        (("encode", "{images}", "--shard", "3/2"), "--shard takes I/N"),
        (("bench", "--batch", "0"), "--batch must be at least 1"),
        (("bench", "--seconds", "0"), "--seconds must be positive"),
    ],
)
def test_bad_options_are_refused_in_one_line(
    args: tuple[str, ...], fragment: str, export_dir: Path, mixed_folder: Path, tmp_path: Path
) -> None:
    command, *rest = (a.format(images=mixed_folder) for a in args)
    where = ["--model", str(export_dir), "--out", str(tmp_path / "c.npy")] if command == "encode" else [str(export_dir)]
    one_error_line(run_cli(command, *where, *rest), fragment)
    assert list(tmp_path.iterdir()) == []

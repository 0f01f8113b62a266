"""The command line, run as real subprocesses on real files: the happy path and every bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import one_error_line as _one_error_line
from tests.conftest import run_cli, write_mixed_folder

REQUIRED_METRICS = {"step", "train_mse", "val_mse", "val_psnr", "codebook_loss", "commit_loss", "usage", "perplexity"}


def test_train_writes_checkpoint_metrics_and_figures(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "data.npy", images)
    result = run_cli(
        "train",
        "--data",
        "data.npy",
        "--steps",
        "12",
        "--batch-size",
        "16",
        "--codes",
        "32",
        "--dim",
        "16",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    run = tmp_path / "runs" / "run-001"
    assert (run / "checkpoint.pt").is_file() and (run / "figures" / "loss.png").is_file()
    assert list((run / "figures").glob("recon_step*.png"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 12 and REQUIRED_METRICS <= records[-1].keys()
    assert f"checkpoint: {Path('runs/run-001/checkpoint.pt')}" in result.stdout
    # A second run never lands on the first; an explicit --out that holds a run is refused.
    again = run_cli(
        "train",
        "--data",
        "data.npy",
        "--steps",
        "2",
        "--batch-size",
        "16",
        "--codes",
        "32",
        "--dim",
        "16",
        cwd=tmp_path,
    )
    assert again.returncode == 0 and (tmp_path / "runs" / "run-002" / "checkpoint.pt").is_file()
    before = (run / "checkpoint.pt").read_bytes()
    refused = run_cli("train", "--data", "data.npy", "--out", str(run), "--steps", "2", cwd=tmp_path)
    _one_error_line(refused, "already holds a run", "--resume")
    assert (run / "checkpoint.pt").read_bytes() == before


def test_export_encode_decode_end_to_end(trained_checkpoint: Path, tmp_path: Path) -> None:
    exported = run_cli("export", str(trained_checkpoint), "--out", str(tmp_path / "model"))
    assert exported.returncode == 0, exported.stderr
    assert "exact" in exported.stdout and "CPU" in exported.stdout
    images = tmp_path / "images"
    files = write_mixed_folder(images)
    encoded = run_cli(
        "encode",
        str(images),
        "--model",
        str(tmp_path / "model"),
        "--out",
        str(tmp_path / "codes.npy"),
        "--batch-size",
        "3",
    )
    assert encoded.returncode == 0, encoded.stderr
    assert "CPUExecutionProvider" in encoded.stderr and "resized 8 of 8" in encoded.stderr
    codes = np.load(tmp_path / "codes.npy")
    assert codes.shape == (8, 2, 2) and codes.dtype == np.uint8
    sidecar = json.loads((tmp_path / "codes.json").read_text())
    assert sidecar["files"] == [str(f) for f in files]
    decoded = run_cli(
        "decode", str(tmp_path / "codes.npy"), "--model", str(tmp_path / "model"), "--out", str(tmp_path / "recon")
    )
    assert decoded.returncode == 0, decoded.stderr
    pngs = sorted((tmp_path / "recon").glob("*.png"))
    assert [p.name for p in pngs][:2] == ["0000_astronaut.png", "0001_camera_grey.png"] and len(pngs) == 8
    assert np.asarray(Image.open(pngs[0])).shape == (32, 32, 3)


def test_no_resize_keeps_multiples_of_sixteen(export_dir: Path, tmp_path: Path) -> None:
    big = np.random.default_rng(1).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    Image.fromarray(big).save(tmp_path / "big.png")
    result = run_cli(
        "encode", str(tmp_path / "big.png"), "--model", str(export_dir), "--out", str(tmp_path / "c.npy"), "--no-resize"
    )
    assert result.returncode == 0, result.stderr
    assert np.load(tmp_path / "c.npy").shape == (1, 4, 6)
    Image.fromarray(big[:50]).save(tmp_path / "odd.png")
    odd = run_cli(
        "encode", str(tmp_path / "odd.png"), "--model", str(export_dir), "--out", str(tmp_path / "d.npy"), "--no-resize"
    )
    _one_error_line(odd, "odd.png", "not a multiple of 16")
    assert not (tmp_path / "d.npy").exists()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("problem", ["truncated", "not-an-image", "empty-folder"])
def test_bad_images_fail_in_one_line_and_keep_the_previous_codes(
    export_dir: Path, tmp_path: Path, problem: str
) -> None:
    images = tmp_path / "images"
    write_mixed_folder(images)
    out = tmp_path / "codes.npy"
    first = run_cli("encode", str(images), "--model", str(export_dir), "--out", str(out))
    assert first.returncode == 0
    previous = out.read_bytes()
    if problem == "truncated":
        bad = images / "sub" / "chelsea.jpg"
        bad.write_bytes(bad.read_bytes()[:2000])
        target, expected = images, (str(bad), "truncated")
    elif problem == "not-an-image":
        bad = images / "notes.png"
        bad.write_text("hello")
        target, expected = images, (str(bad), "not an image")
    else:
        target = tmp_path / "empty"
        target.mkdir()
        expected = (str(target), "no images found")
    result = run_cli("encode", str(target), "--model", str(export_dir), "--out", str(out), "--overwrite")
    _one_error_line(result, *expected)
    assert out.read_bytes() == previous
    assert _leftovers(tmp_path) == []


def test_missing_and_corrupt_checkpoints_fail_in_one_line(tmp_path: Path, trained_checkpoint: Path) -> None:
    _one_error_line(run_cli("export", str(tmp_path / "nope.pt")), "nope.pt", "no such checkpoint")
    data = trained_checkpoint.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    _one_error_line(run_cli("export", str(tmp_path / "cut.pt"), "--out", str(tmp_path / "x")), "cut.pt", "corrupt")
    assert not (tmp_path / "x").exists()


def test_decode_refuses_codes_out_of_range_or_from_another_model(export_dir: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "wild.npy", np.array([[[1, 2], [300, 4]]], dtype=np.uint16))
    result = run_cli("decode", str(tmp_path / "wild.npy"), "--model", str(export_dir), "--out", str(tmp_path / "o"))
    _one_error_line(result, "wild.npy", "code 300", "outside 0..255")
    assert not (tmp_path / "o").exists()

    np.save(tmp_path / "codes.npy", np.zeros((1, 2, 2), np.uint8))
    sidecar = {
        "files": ["a.png"],
        "grid": [2, 2],
        "codes": 256,
        "dtype": "uint8",
        "manifest_sha256": "0" * 64,
        "checkpoint_sha256": "f" * 64,
        "format": "vqtool.codes",
    }
    (tmp_path / "codes.json").write_text(json.dumps(sidecar))
    result = run_cli("decode", str(tmp_path / "codes.npy"), "--model", str(export_dir), "--out", str(tmp_path / "o"))
    _one_error_line(result, "codes.npy", "another model")
    assert not (tmp_path / "o").exists()


def test_graph_changed_after_export_is_refused(export_dir: Path, mixed_folder: Path, tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(export_dir, copy)
    with open(copy / "encoder.onnx", "ab") as handle:
        handle.write(b"\0")
    result = run_cli("encode", str(mixed_folder), "--model", str(copy), "--out", str(tmp_path / "c.npy"))
    _one_error_line(result, "encoder.onnx", "checksum")


def test_invalid_training_options_are_refused_not_replaced(tmp_path: Path) -> None:
    result = run_cli("train", "--epochs", "0", "--out", str(tmp_path / "run"))
    _one_error_line(result, "epochs must be at least 1")
    assert not (tmp_path / "run").exists()


def test_encode_and_decode_open_only_the_sessions_they_run(
    export_dir: Path, mixed_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`vqtool encode` starts the encoder's session and nothing else (no decoder, no second copy of the encoder for
    small batches); `vqtool decode` the decoder's. The Python API, which serves both verbs, starts both graphs,
    and a small in-memory batch adds the encoder's session for small batches: the count sees every session."""
    import onnxruntime
    from typer.testing import CliRunner

    import vqtool
    from vqtool.cli import app

    opened: list[str] = []

    class Counted(onnxruntime.InferenceSession):  # type: ignore[misc]
        def __init__(self, path: str, *args: object, **kwargs: object) -> None:
            opened.append(Path(path).name)
            super().__init__(path, *args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", Counted)
    cli = CliRunner()
    codes = tmp_path / "codes.npy"
    encoded = cli.invoke(app, ["encode", str(mixed_folder), "--model", str(export_dir), "--out", str(codes)])
    assert encoded.exit_code == 0, encoded.output
    assert opened == ["encoder.onnx"]
    opened.clear()
    decoded = cli.invoke(app, ["decode", str(codes), "--model", str(export_dir), "--out", str(tmp_path / "png")])
    assert decoded.exit_code == 0, decoded.output
    assert opened == ["decoder.onnx"]
    opened.clear()
    with vqtool.load(export_dir, "onnxruntime", "cpu", threads=2) as tok:
        tok.encode(np.zeros((1, 32, 32, 3), np.uint8))
    assert opened == ["encoder.onnx", "decoder.onnx", "encoder.onnx"]

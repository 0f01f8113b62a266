"""Encoding on Ray Data: `vqtool encode --engine ray` and `map_batches(TokenizeBatch)` give the local codes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import vqtool
from tests.collections_made import sample_key, write_parquet_files, write_tar_shards
from tests.conftest import REPO, one_error_line, run_cli, write_photo_folder
from tests.ray_scenarios import DIE_MARKER

# Looked up, not imported: Ray stays out of this process (see tests/ray_scenarios.py).
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="the ray extra is not installed: pip install 'vqtool[ray]'"
)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("photos")
    files = sorted(write_photo_folder(root, 48, seed=7), key=lambda p: p.as_posix())
    return root, files


@pytest.fixture(scope="module")
def scenarios(export_dir: Path, photos: tuple[Path, list[Path]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/ray_scenarios.py run once, in a process of its own (a Ray driver's gRPC state must not reach this one,
    which forks reader processes later): the in-process Ray runs below check what it wrote."""
    root, files = photos
    out = tmp_path_factory.mktemp("ray-scenarios")
    write_parquet_files(files, root, out / "parquet", per_file=24)
    env = {**os.environ, "PYTHONPATH": str(REPO), DIE_MARKER: str(out / "died")}
    command = [sys.executable, "-m", "tests.ray_scenarios", str(export_dir), str(root), str(out / "parquet"), str(out)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


@pytest.fixture(scope="module")
def local_codes(export_dir: Path, photos: tuple[Path, list[Path]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root, _ = photos
    out = tmp_path_factory.mktemp("local") / "codes.npy"
    vqtool.load(export_dir).encode_files(root, out, log=lambda _: None)
    return out


def test_engine_ray_gives_the_local_codes_key_by_key_and_skips_what_local_skips(
    export_dir: Path, photos: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    """Through the command, which starts its own local Ray: a folder, tar shards and Parquet, one bad file."""
    root, files = photos
    write_tar_shards(files[:20], root, tmp_path / "shards", per_shard=7)
    write_parquet_files(files[20:], root, tmp_path / "parquet", per_file=15)
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but cut short")
    inputs = [str(root), str(tmp_path / "more"), str(tmp_path / "shards"), str(tmp_path / "parquet")]
    local = run_cli("encode", *inputs, "--model", str(export_dir), "--out", str(tmp_path / "local.npy"), "--skip-bad")
    assert local.returncode == 0, local.stderr
    on_ray = run_cli(
        "encode", *inputs, "--model", str(export_dir), "--out", str(tmp_path / "ray.npy"), "--skip-bad",
        "--engine", "ray",
    )  # fmt: skip
    assert on_ray.returncode == 0, on_ray.stderr
    assert "on Ray" in on_ray.stderr and "skipped 1 of" in on_ray.stderr
    assert np.array_equal(np.load(tmp_path / "ray.npy"), np.load(tmp_path / "local.npy"))
    sidecars = [json.loads((tmp_path / f"{name}.json").read_text()) for name in ("local", "ray")]
    assert sidecars[1]["files"] == sidecars[0]["files"] and len(sidecars[0]["files"]) == 48 + 48
    assert sidecars[1]["backend"] == sidecars[0]["backend"] == "onnxruntime"
    assert sidecars[1]["skipped"] == sidecars[0]["skipped"] and "broken.png" in sidecars[0]["skipped"][0]["file"]
    assert not list(tmp_path.glob(".ray.npy*"))  # the staging folder is gone once the codes are in place


def test_engine_ray_refuses_in_one_line_what_it_cannot_do(export_dir: Path, tmp_path: Path) -> None:
    write_photo_folder(tmp_path / "p", 1)
    image = next((tmp_path / "p").rglob("*.png"))
    out = str(tmp_path / "c.npy")
    sharded = run_cli(
        "encode", str(image), "--model", str(export_dir), "--out", out, "--engine", "ray", "--shard", "0/2"
    )
    one_error_line(sharded, "--shard", "--engine ray")
    stray = run_cli("encode", str(image), "--model", str(export_dir), "--out", out, "--ray-address", "auto")
    one_error_line(stray, "--ray-address is for --engine ray")
    # Where Ray is not installed (a package on the path that fails to import as a missing one does).
    hidden = tmp_path / "hidden"
    (hidden / "ray").mkdir(parents=True)
    (hidden / "ray" / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'ray'\", name='ray')\n")
    missing = run_cli(
        "encode", str(image), "--model", str(export_dir), "--out", out, "--engine", "ray",
        env={"PYTHONPATH": f"{hidden}{os.pathsep}{REPO}"},
    )  # fmt: skip
    one_error_line(missing, "--engine ray needs ray", "pip install 'vqtool[ray]'")


def test_map_batches_tokenize_batch_gives_the_local_codes_of_each_file(
    scenarios: Path, local_codes: Path, photos: tuple[Path, list[Path]]
) -> None:
    root, files = photos
    local = dict(zip(map(str, files), np.load(local_codes), strict=True))
    # Decoded by Ray Data's own image reader: one array per row, of the files' own sizes.
    read = np.load(scenarios / "read_images.npz")
    assert len(read["paths"]) == len(files)
    for path, codes in zip(read["paths"], read["codes"], strict=True):
        path = path if os.path.isabs(path) else f"/{path}"
        assert np.array_equal(codes, local[path]), path
    # Image bytes in Parquet (img2dataset's layout), decoded in the actor.
    parquet = np.load(scenarios / "read_parquet.npz")
    by_key = dict(zip(parquet["keys"], parquet["codes"], strict=True))
    assert by_key.keys() == {sample_key(f, root) for f in files}
    for file in files:
        assert np.array_equal(by_key[sample_key(file, root)], local[str(file)]), file


def test_a_killed_tokenizer_actor_is_restarted_and_no_image_is_lost_or_coded_twice(
    scenarios: Path, local_codes: Path, photos: tuple[Path, list[Path]]
) -> None:
    _, files = photos
    assert (scenarios / "died").exists()  # the fault bit: an actor process died mid-run
    table = pq.read_table(scenarios / "killed.parquet")
    assert table.column("key").to_pylist() == [str(f) for f in files]
    grids = np.asarray(table.column("codes").to_pylist()).reshape(np.load(local_codes).shape)
    assert np.array_equal(grids, np.load(local_codes))
    assert pa.types.is_list(table.schema.field("codes").type)


def test_a_bad_file_ends_a_ray_run_with_the_local_engines_one_line_error(scenarios: Path) -> None:
    said = (scenarios / "bad-file.txt").read_text()
    assert said == f"{scenarios / 'broken' / 'broken.png'}: not an image file (or a format Pillow cannot read)"
    assert not (scenarios / "bad.npy").exists()


def test_an_interrupted_ray_run_resumes_with_only_the_rows_not_stored(
    scenarios: Path, local_codes: Path, photos: tuple[Path, list[Path]]
) -> None:
    _, files = photos
    facts = json.loads((scenarios / "resume.json").read_text())
    # Stopped after every block was stored, before the join: nothing in place yet; one block then cut short.
    assert facts["blocks"] >= 2 and not facts["output_before"]
    lost = len(files) - facts["kept_rows"]
    assert 0 < lost < len(files)
    assert "other files or used another model" in facts["refused"]
    assert f"{len(files) - lost} already stored" in facts["said"][0]
    assert np.array_equal(np.load(scenarios / "resumed.npy"), np.load(local_codes))
    assert json.loads((scenarios / "resumed.json").read_text())["files"] == [str(f) for f in files]

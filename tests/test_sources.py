"""What encode reads besides folders (tar shards, Parquet, lists) and codes.parquet, on one machine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import vqtool
from tests.collections_made import sample_key, write_parquet_files, write_tar_shards
from tests.conftest import one_error_line, run_cli, write_photo_folder
from vqtool.errors import VqtoolError
from vqtool.pipeline.shards import merge_shards


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("photos")
    files = sorted(write_photo_folder(root, 30, seed=5), key=lambda p: p.as_posix())
    return root, files


def test_tar_shards_parquet_and_lists_give_the_codes_of_their_folder(
    export_dir: Path, photos: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    root, files = photos
    write_tar_shards(files, root, tmp_path / "shards", per_shard=12)
    write_parquet_files(files, root, tmp_path / "parquet", per_file=13)
    (tmp_path / "list.txt").write_text("".join(f"{f}\n" for f in files))
    tok = vqtool.load(export_dir)
    reference = tok.encode_files(root, tmp_path / "folder.npy", log=lambda _: None)
    folder_codes = np.load(reference.codes_path)
    keys = [sample_key(f, root) for f in files]
    assert reference.count == len(files) == 30

    # Through the command: a brace pattern of shards into codes.npy, a folder of Parquet files into codes.parquet.
    pattern = str(tmp_path / "shards" / "part-{00000..00002}.tar")
    tar_run = run_cli("encode", pattern, "--model", str(export_dir), "--out", str(tmp_path / "tar.npy"))
    assert tar_run.returncode == 0, tar_run.stderr
    assert np.array_equal(np.load(tmp_path / "tar.npy"), folder_codes)
    assert json.loads((tmp_path / "tar.json").read_text())["files"] == keys
    out = tmp_path / "codes.parquet"
    parquet_run = run_cli("encode", str(tmp_path / "parquet"), "--model", str(export_dir), "--out", str(out))
    assert parquet_run.returncode == 0, parquet_run.stderr
    assert not (tmp_path / "codes.json").exists()  # the sidecar is in the file's metadata
    table = pq.read_table(out)
    assert table.column("key").to_pylist() == keys
    assert table.schema.field("codes").type == pa.list_(pa.uint8())  # K = 256: the smallest unsigned type
    grids = np.asarray(table.column("codes").to_pylist()).reshape(folder_codes.shape)
    assert np.array_equal(grids, folder_codes)
    assert set(table.column("height").to_pylist()) == {2} and set(table.column("width").to_pylist()) == {2}
    metadata = json.loads(table.schema.metadata[b"vqtool.codes"])
    sidecar = json.loads((tmp_path / "folder.json").read_text())
    for field in ("manifest_sha256", "checkpoint_sha256", "precision", "grid", "codes", "dtype"):
        assert metadata[field] == sidecar[field], field

    # Through the API: a list of paths, and a folder of shards; one run may mix forms, in the order given.
    listed = tok.encode_files(tmp_path / "list.txt", tmp_path / "list.npy", log=lambda _: None)
    assert np.array_equal(np.load(listed.codes_path), folder_codes)
    mixed = tok.encode_files([tmp_path / "shards", files[0]], tmp_path / "mixed.npy", log=lambda _: None)
    assert np.array_equal(np.load(mixed.codes_path), np.concatenate([folder_codes[:1], folder_codes]))

    # decode reads codes.parquet as it reads codes.npy.
    decoded = run_cli("decode", str(out), "--model", str(export_dir), "--out", str(tmp_path / "recon"))
    assert decoded.returncode == 0, decoded.stderr
    pngs = sorted((tmp_path / "recon").glob("*.png"))
    assert len(pngs) == 30 and pngs[0].name == f"0000_{keys[0]}.png"
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(pngs[7])), tok.decode(folder_codes[7:8])[0])


def test_shards_of_tar_samples_merge_into_the_single_pass(
    export_dir: Path, photos: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    root, files = photos
    write_tar_shards(files, root, tmp_path / "shards", per_shard=8)
    tok = vqtool.load(export_dir)
    single = tok.encode_files(tmp_path / "shards", tmp_path / "all.npy", log=lambda _: None)
    parts = [
        tok.encode_files(tmp_path / "shards", tmp_path / f"part{i}.npy", shard=f"{i}/3", log=lambda _: None).codes_path
        for i in range(3)
    ]
    merged = merge_shards(parts, tmp_path / "merged.npy")
    assert np.array_equal(np.load(tmp_path / "merged.npy"), np.load(single.codes_path))
    assert merged.files == json.loads(single.sidecar_path.read_text())["files"]


def test_parquet_inputs_name_the_file_and_the_problem(
    export_dir: Path, photos: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    root, files = photos
    tok = vqtool.load(export_dir)
    # datasets' Image feature ({bytes, path} structs) under "image", no key column: rows are named file#row.
    images = pa.array([{"bytes": f.read_bytes(), "path": f.name} for f in files[:5]])
    pq.write_table(pa.table({"image": images, "label": list(range(5))}), tmp_path / "hf.parquet")
    result = tok.encode_files(tmp_path / "hf.parquet", tmp_path / "hf.npy", log=lambda _: None)
    expected = tok.encode_files(files[:5], tmp_path / "files.npy", log=lambda _: None)
    assert np.array_equal(np.load(result.codes_path), np.load(expected.codes_path))
    assert json.loads(result.sidecar_path.read_text())["files"][1] == f"{tmp_path / 'hf.parquet'}#1"

    write_parquet_files(files[:4], root, tmp_path / "pics", per_file=4, image_column="picture")
    found = tmp_path / "pics" / "part-00000.parquet"
    with pytest.raises(VqtoolError, match="no image column found .*--image-column") as caught:
        tok.encode_files(found, tmp_path / "x.npy", log=lambda _: None)
    assert str(found) in str(caught.value)
    named = tok.encode_files(found, tmp_path / "x.npy", image_column="picture", key_column="caption", log=print)
    assert json.loads(named.sidecar_path.read_text())["files"] == ["a photograph"] * 4
    command = run_cli(
        "encode", str(found), "--model", str(export_dir), "--out", str(tmp_path / "y.npy"), "--image-column", "jpg"
    )
    one_error_line(command, str(found), "no column 'jpg'", "picture")

    # A cell that is no image: the one-line error names the file and row; --skip-bad leaves it out and lists it.
    cells = [f.read_bytes() for f in files[:3]]
    cells[1] = b"not an image"
    pq.write_table(pa.table({"key": ["a", "b", "c"], "jpg": cells}), tmp_path / "bad.parquet")
    with pytest.raises(VqtoolError, match="not an image file") as bad:
        tok.encode_files(tmp_path / "bad.parquet", tmp_path / "bad.npy", log=lambda _: None)
    assert f"{tmp_path / 'bad.parquet'}#1" in str(bad.value)
    skipped = tok.encode_files(
        tmp_path / "bad.parquet", tmp_path / "bad.parquet.out.parquet", skip_bad=True, log=lambda _: None
    )
    assert skipped.count == 2 and skipped.skipped and skipped.skipped[0].file == f"{tmp_path / 'bad.parquet'}#1"
    assert pq.read_table(skipped.codes_path).column("key").to_pylist() == ["a", "c"]


def test_a_shard_of_parquet_rows_starts_inside_a_large_row_group(
    export_dir: Path, photos: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    """One row group of 600 rows, read in record batches of 256: the second half starts in the second batch."""
    root, files = photos
    tok = vqtool.load(export_dir)
    folder = np.load(tok.encode_files(root, tmp_path / "folder.npy", log=lambda _: None).codes_path)
    cells = [files[i % len(files)].read_bytes() for i in range(600)]
    keys = [f"k{i:03d}" for i in range(600)]
    pq.write_table(pa.table({"key": keys, "jpg": cells}), tmp_path / "big.parquet", row_group_size=600)
    assert pq.ParquetFile(tmp_path / "big.parquet").metadata.num_row_groups == 1
    half = tok.encode_files(tmp_path / "big.parquet", tmp_path / "half.parquet", shard="1/2", log=lambda _: None)
    table = pq.read_table(half.codes_path)
    assert table.column("key").to_pylist() == keys[300:]
    grids = np.asarray(table.column("codes").to_pylist()).reshape(300, *folder.shape[1:])
    assert np.array_equal(grids, folder[[i % len(files) for i in range(300, 600)]])

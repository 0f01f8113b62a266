"""Nothing a file can do to you: each test is an attack or an accident, tried for real.

Files from others are data (no code runs from a pickle, a weights file, an export or a preprocessor config), one
run writes one output at a time, and nothing vqtool did not write is overwritten or deleted."""

from __future__ import annotations

import ast
import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO, one_error_line, run_cli, start_cli
from vqtool.errors import VqtoolError

# ---- no code from data -------------------------------------------------------------------------------------------

PACKAGES = ("vqtool", "train", "export")


def _code_from_data(source: str) -> list[str]:
    """Every call in `source` through which a file could make Python run code: unpickling without an allow-list,
    torch.load without weights_only=True, np.load(allow_pickle=True), eval/exec/compile, trust_remote_code=True,
    yaml.load and the other loaders that build arbitrary objects."""
    tree = ast.parse(source)
    found = []
    guarded = {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef)
        and any(ast.unparse(base) == "pickle.Unpickler" for base in node.bases)
        and any(isinstance(item, ast.FunctionDef) and item.name == "find_class" for item in node.body)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name not in guarded:
            if any(ast.unparse(base) == "pickle.Unpickler" for base in node.bases):
                found.append(f"line {node.lineno}: an Unpickler without find_class")
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        keywords = {k.arg: k.value for k in node.keywords}
        if name in ("eval", "exec", "compile"):
            found.append(f"line {node.lineno}: {name}()")
        if name in (
            "pickle.load",
            "pickle.loads",
            "pickle.Unpickler",
            "marshal.loads",
            "shelve.open",
            "dill.load",
            "dill.loads",
            "joblib.load",
            "yaml.unsafe_load",
            "jsonpickle.decode",
        ):
            found.append(f"line {node.lineno}: {name}()")
        if name == "yaml.load" and "SafeLoader" not in ast.unparse(keywords.get("Loader", ast.Constant(None))):
            found.append(f"line {node.lineno}: yaml.load() without SafeLoader")
        if name.endswith("torch.load") and not (
            isinstance(keywords.get("weights_only"), ast.Constant) and keywords["weights_only"].value is True
        ):
            found.append(f"line {node.lineno}: torch.load() without weights_only=True")
        pickles = keywords.get("allow_pickle")
        if name in ("np.load", "numpy.load") and pickles is not None and ast.unparse(pickles) != "False":
            found.append(f"line {node.lineno}: {name}(allow_pickle=...)")
        remote = keywords.get("trust_remote_code")
        if remote is not None and not (isinstance(remote, ast.Constant) and remote.value is False):
            found.append(f"line {node.lineno}: trust_remote_code that is not False")
        extra = [k.value for k in node.keywords if k.arg is None]  # **options: a trust_remote_code could hide there
        for value in extra:
            if "trust_remote_code" in ast.unparse(value) and "False" not in ast.unparse(value):
                found.append(f"line {node.lineno}: trust_remote_code passed through **")
    return found


def test_the_checker_finds_each_way_code_runs_from_a_file() -> None:
    planted = """
import pickle, numpy as np, torch, yaml
class Loose(pickle.Unpickler):
    pass
pickle.loads(data)
torch.load(path)
torch.load(path, weights_only=False)
np.load(path, allow_pickle=True)
eval(text)
exec(text)
yaml.load(text)
Model.from_pretrained(folder, trust_remote_code=True)
"""
    assert len(_code_from_data(planted)) == 9, _code_from_data(planted)
    kept = """
import pickle, numpy as np, torch
class Strict(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(name)
Strict(handle).load()
torch.load(path, weights_only=True)
np.load(path, allow_pickle=False, mmap_mode="r")
model.eval()
Model.from_pretrained(folder, trust_remote_code=False)
"""
    assert _code_from_data(kept) == []


def test_no_path_a_file_can_reach_runs_code_from_it() -> None:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            problems = _code_from_data(path.read_text())
            if problems:
                found[str(path.relative_to(REPO))] = problems
    assert found == {}


class _RunsNumpyCode:
    """Unpickles into a call of NumPy's own `runstring`, which execs a string: here, one that creates a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        from numpy.testing._private.utils import runstring

        return runstring, (f"open({str(self.marker)!r}, 'w').write('ran')", {})


def test_a_cifar_batch_that_names_a_numpy_function_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    payload = pickle.dumps({b"data": _RunsNumpyCode(marker), b"labels": [0]})
    pickle.loads(payload)  # the fault bites: a plain unpickler runs it
    assert marker.read_text() == "ran"
    marker.unlink()
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(payload)
    result = run_cli("train", "--data", str(folder), "--steps", "1", "--out", str(tmp_path / "run"))
    one_error_line(result, "data_batch_1", "numpy.testing._private.utils.runstring", "refusing")
    assert not marker.exists()
    assert not (tmp_path / "run").exists()


def test_a_real_cifar_batch_still_reads(tmp_path: Path) -> None:
    from vqtool.data.whole import read_image_set

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for protocol in (4, 5):  # what Python 3 writes (5: with NumPy's out-of-band reconstruction)
        for name in (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"):
            batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [1, 2, 3, 4]}
            (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
        images, val = read_image_set(folder, 32)
        assert images.shape == (20, 32, 32, 3) and val is not None and val.shape == (4, 32, 32, 3)


def test_pickled_weights_need_a_pytorch_whose_weights_only_loader_is_safe(
    trained_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from vqtool.model.checkpoint import CheckpointError, load_checkpoint

    load_checkpoint(trained_checkpoint)  # reads with the installed PyTorch
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    with pytest.raises(CheckpointError, match="CVE-2025-32434"):
        load_checkpoint(trained_checkpoint)


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return os.system, (f"touch {self.marker}",)


def test_import_reads_safetensors_only_unless_pickles_are_allowed_and_then_never_runs_them(tmp_path: Path) -> None:
    import torch

    from tests.test_import import make_vqmodel
    from vqtool.model.importing import import_model

    model = make_vqmodel(tmp_path / "vq")
    pickled = tmp_path / "pickled"
    model.save_pretrained(pickled, safe_serialization=False)
    assert not list(pickled.glob("*.safetensors")) and list(pickled.glob("*.bin"))
    with pytest.raises(VqtoolError, match="--allow-pickle"):
        import_model(pickled, tmp_path / "a.pt", log=lambda _: None)
    assert not (tmp_path / "a.pt").exists()
    import_model(pickled, tmp_path / "a.pt", allow_pickle=True, log=lambda _: None)
    assert (tmp_path / "a.pt").is_file()

    marker = tmp_path / "ran"
    weights = next(pickled.glob("*.bin"))
    torch.save({"encoder.conv_in.weight": _RunsCode(marker)}, weights, pickle_module=pickle)
    with pytest.raises(VqtoolError, match="weights alone"):
        import_model(pickled, tmp_path / "b.pt", allow_pickle=True, log=lambda _: None)
    assert not marker.exists() and not (tmp_path / "b.pt").exists()
    torch.load(weights, weights_only=False)  # the fault bites: a full unpickle runs it
    assert marker.exists()


def test_import_reads_no_processor_settings_from_above_source_and_refuses_a_malformed_one(tmp_path: Path) -> None:
    from tests.test_import import make_vqmodel
    from vqtool.model.importing import import_model

    make_vqmodel(tmp_path / "pipeline" / "vq")
    above = tmp_path / "pipeline" / "preprocessor_config.json"
    above.write_text(json.dumps({"image_mean": [0.2, 0.2, 0.2], "image_std": [0.3, 0.3, 0.3]}))
    said: list[str] = []
    import_model(tmp_path / "pipeline" / "vq", tmp_path / "a.pt", log=said.append)
    assert "image processor defaults" in said[0] and str(above) not in said[0]
    said.clear()
    import_model(tmp_path / "pipeline", tmp_path / "b.pt", subfolder="vq", log=said.append)
    assert str(above) in said[0]  # inside SOURCE, as a pipeline keeps it, it is read
    for broken in ({"image_mean": "grey"}, {"image_std": [0, 1, 1]}, {"rescale_factor": -1}, {"do_normalize": "yes"}):
        above.write_text(json.dumps(broken))
        with pytest.raises(VqtoolError, match=str(above)):
            import_model(tmp_path / "pipeline", tmp_path / "c.pt", subfolder="vq", log=lambda _: None)
    assert not (tmp_path / "c.pt").exists()


# ---- exports from others -----------------------------------------------------------------------------------------


@pytest.fixture
def export_copy(export_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "export"
    shutil.copytree(export_dir, copy)
    return copy


def _rewrite_manifest(export: Path, **changes: object) -> None:
    manifest = export / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), **changes}))


def test_an_export_makes_vqtool_read_nothing_outside_its_folder(export_copy: Path, tmp_path: Path) -> None:
    import vqtool

    _rewrite_manifest(export_copy, pytorch_file="../model.pt")
    with pytest.raises(VqtoolError, match="'pytorch_file' must name a file inside the export folder"):
        vqtool.load(export_copy)
    _rewrite_manifest(export_copy, pytorch_file="model.pt")
    outside = tmp_path / "elsewhere.onnx"
    shutil.move(export_copy / "encoder.onnx", outside)
    (export_copy / "encoder.onnx").symlink_to(outside)
    with pytest.raises(VqtoolError, match="outside the export folder"):
        vqtool.load(export_copy, backend="onnxruntime")


def test_a_graph_that_reads_other_files_is_refused_before_a_runtime_opens_it(export_copy: Path) -> None:
    import onnx
    import onnxruntime as ort

    import vqtool
    from vqtool.formats.manifest import sha256_file

    graph = export_copy / "encoder.onnx"
    model = onnx.load(str(graph))
    onnx.save(model, str(graph), save_as_external_data=True, location="weights.bin", size_threshold=1024)
    ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])  # the fault bites: the runtime reads it
    manifest = json.loads((export_copy / "manifest.json").read_text())
    manifest["graphs"]["encoder"]["sha256"] = sha256_file(graph)  # whoever made the folder controls the manifest
    (export_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(VqtoolError, match="keeps tensor data in other files"):
        vqtool.load(export_copy, backend="onnxruntime")


def test_engine_files_never_run_with_engines_off(export_copy: Path) -> None:
    import vqtool

    (export_copy / "encoder.engine").write_bytes(b"not to be trusted")
    with pytest.raises(VqtoolError, match="engines=False"):
        vqtool.load(export_copy, backend="tensorrt", engines=False)
    tok = vqtool.load(export_copy, engines=False)
    assert "tensorrt on cuda: engine files ignored" in tok.describe()


# ---- one writer per output ---------------------------------------------------------------------------------------


def _small_pngs(folder: Path, count: int, seed: int) -> list[Path]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{index:04d}.png")
    return sorted(folder.glob("*.png"))


def _wait_for(condition: object, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _lock_holder(out: Path) -> int | None:
    lock = out.with_name(f".{out.name}.lock")
    try:
        return int(json.loads(lock.read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None


def test_two_runs_never_write_one_output_and_a_dead_runs_lock_is_taken_over(export_dir: Path, tmp_path: Path) -> None:
    first = _small_pngs(tmp_path / "first", 200, seed=1)
    _small_pngs(tmp_path / "second", 100, seed=2)
    out = tmp_path / "codes.npy"
    args = ["--model", str(export_dir), "--out", str(out), "--batch-size", "1", "--readers", "2"]

    running = start_cli("encode", str(tmp_path / "first"), *args)
    _wait_for(lambda: _lock_holder(out) == running.pid and _children(running.pid))
    os.kill(running.pid, signal.SIGSTOP)  # the first run, frozen part way, holds the output
    second = run_cli("encode", str(tmp_path / "second"), *args)
    one_error_line(second, str(out), "another vqtool run is writing this output", f"pid {running.pid}")
    os.kill(running.pid, signal.SIGCONT)
    assert running.wait(timeout=120) == 0, running.stderr.read() if running.stderr else ""
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["files"] == [str(path) for path in first] and len(np.load(out)) == len(first)

    # Killed outright, a run leaves its lock file and temporary files, and its reader processes end with it.
    running = start_cli("encode", str(tmp_path / "second"), *args, "--overwrite")
    _wait_for(lambda: _lock_holder(out) == running.pid and _children(running.pid))
    readers = _children(running.pid)
    running.send_signal(signal.SIGKILL)
    running.wait(timeout=30)
    _wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in readers), seconds=10)
    assert out.with_name(f".{out.name}.lock").exists()
    taken_over = run_cli("encode", str(tmp_path / "second"), *args, "--overwrite")
    assert taken_over.returncode == 0, taken_over.stderr
    assert len(np.load(out)) == 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codes.json", "codes.npy", "first", "second"]


def test_the_ray_engine_takes_the_same_lock_before_it_starts(export_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray")
    from vqtool.formats.lock import OutputLock
    from vqtool.ray.engine import encode_on_ray, staging_path

    _small_pngs(tmp_path / "images", 4, seed=3)
    out = tmp_path / "codes.npy"
    staging_path(out).mkdir()  # a live run's stored blocks
    (staging_path(out) / "rows-000000000000-4.parquet").write_bytes(b"a block")
    with OutputLock(out), pytest.raises(VqtoolError, match="another vqtool run is writing this output"):
        encode_on_ray([tmp_path / "images"], out, export_dir)
    assert (staging_path(out) / "rows-000000000000-4.parquet").read_bytes() == b"a block"


# ---- never overwrite what vqtool did not write -------------------------------------------------------------------


def test_encode_replaces_no_file_it_did_not_write(export_dir: Path, tmp_path: Path) -> None:
    import vqtool

    images = _small_pngs(tmp_path / "images", 3, seed=4)
    tok = vqtool.load(export_dir)
    manifest = (export_dir / "manifest.json").read_bytes()
    with pytest.raises(VqtoolError, match="manifest.json: is not a codes sidecar written by vqtool"):
        tok.encode_files(images, export_dir / "manifest.npy", log=lambda _: None, overwrite=True)
    assert (export_dir / "manifest.json").read_bytes() == manifest and not (export_dir / "manifest.npy").exists()
    with pytest.raises(VqtoolError, match=r"\.npy \(with a \.json sidecar beside it\) or \.parquet"):
        tok.encode_files(images, tmp_path / "codes.json", log=lambda _: None)
    out = tmp_path / "codes.npy"
    out.write_bytes(b"the user's")
    with pytest.raises(VqtoolError, match="exists; pass --overwrite"):
        tok.encode_files(images, out, log=lambda _: None)
    assert out.read_bytes() == b"the user's"
    tok.encode_files(images, out, log=lambda _: None, overwrite=True)
    assert np.load(out).shape == (3, 2, 2)


def test_merge_refuses_an_existing_output_and_a_foreign_sidecar(export_dir: Path, tmp_path: Path) -> None:
    import vqtool
    from vqtool.pipeline.shards import merge_shards

    images = _small_pngs(tmp_path / "images", 4, seed=5)
    tok = vqtool.load(export_dir)
    shards = [tmp_path / f"part{i}.npy" for i in range(2)]
    for index, shard in enumerate(shards):
        tok.encode_files(images, shard, shard=f"{index}/2", log=lambda _: None)
    (tmp_path / "all.json").write_text("{}")
    with pytest.raises(VqtoolError, match="all.json: is not a codes sidecar"):
        merge_shards(shards, tmp_path / "all.npy")
    assert (tmp_path / "all.json").read_text() == "{}"
    (tmp_path / "all.json").unlink()
    merge_shards(shards, tmp_path / "all.npy")
    with pytest.raises(VqtoolError, match="exists"):
        merge_shards(shards, tmp_path / "all.npy")
    merge_shards(shards, tmp_path / "all.npy", overwrite=True)


def test_decode_keeps_files_it_did_not_write_and_names_none_too_long(export_dir: Path, tmp_path: Path) -> None:
    import vqtool

    tok = vqtool.load(export_dir)
    long_name = "a" * 300
    codes = tmp_path / "codes.npy"
    np.save(codes, np.zeros((3, 2, 2), np.uint8))
    sidecar = {
        "format": "vqtool.codes",
        "files": [f"shard.tar/{long_name}", "b/two.png", "c/th\nree.png"],
        "grid": [2, 2],
        "codes": tok.num_codes,
        "dtype": "uint8",
        "manifest_sha256": "",
        "checkpoint_sha256": tok.manifest.checkpoint_sha256,
    }
    codes.with_suffix(".json").write_text(json.dumps(sidecar))
    out = tmp_path / "recon"
    out.mkdir()
    (out / "mine.txt").write_text("the user's")
    with pytest.raises(VqtoolError, match="is not empty; pass --overwrite"):
        tok.decode_file(codes, out, log=lambda _: None)
    tok.decode_file(codes, out, log=lambda _: None, overwrite=True)
    written = sorted(p.name for p in out.glob("*.png"))
    assert len(written) == 3 and all(len(name.encode()) <= 120 for name in written)
    assert "0002_th_ree.png" in written
    sidecar["files"] = ["x.png"]
    np.save(codes, np.zeros((1, 2, 2), np.uint8))
    codes.with_suffix(".json").write_text(json.dumps(sidecar))
    tok.decode_file(codes, out, log=lambda _: None, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [".vqtool-decode.json", "0000_x.png", "mine.txt"]
    # --overwrite replaces what a decode wrote, not a file of the user's that shares a name with one it writes.
    sidecar["files"] = ["x.png", "y.png"]
    np.save(codes, np.zeros((2, 2, 2), np.uint8))
    codes.with_suffix(".json").write_text(json.dumps(sidecar))
    (out / "0001_y.png").write_text("the user's")
    with pytest.raises(VqtoolError, match=r"0001_y\.png: was not written by an earlier decode there"):
        tok.decode_file(codes, out, log=lambda _: None, overwrite=True)
    assert (out / "0001_y.png").read_text() == "the user's"


def test_a_planted_link_at_a_temporary_name_is_never_written_through(tmp_path: Path) -> None:
    from vqtool.images.writing import write_pngs

    target = tmp_path / "victim"
    target.write_text("kept")
    (tmp_path / f".0000.png.{os.getpid()}.tmp").symlink_to(target)
    write_pngs(tmp_path, ["0000.png"], np.zeros((1, 8, 8, 3), np.uint8))
    assert target.read_text() == "kept" and (tmp_path / "0000.png").read_bytes().startswith(b"\x89PNG")


def test_a_link_planted_at_the_codes_partial_file_is_never_written_through(export_dir: Path, tmp_path: Path) -> None:
    """Encode's resumable partial file has a fixed name beside the output: a link left there (by anyone who can
    write to the folder) must not carry the codes into the file it points at, on a fresh run or a resumed one."""
    import vqtool
    from vqtool.data.specs import image_set
    from vqtool.formats.atomic import partial_path
    from vqtool.pipeline.encode import EncodeOptions, plan_encode

    images = _small_pngs(tmp_path / "images", 3, seed=6)
    victim = tmp_path / "elsewhere" / "victim.txt"
    victim.parent.mkdir()
    victim.write_text("kept")
    out = tmp_path / "out" / "codes.npy"
    out.parent.mkdir()
    partial_path(out).symlink_to(victim)
    assert partial_path(out).resolve() == victim  # the planted link leads out of the folder
    tok = vqtool.load(export_dir)
    tok.encode_files(images, out, log=lambda _: None)
    assert victim.read_text() == "kept"
    assert not out.is_symlink() and np.load(out).shape == (3, 2, 2)
    # Resuming: an interrupted run's progress record beside a link in place of its partial file.
    plan = plan_encode(image_set(images), tok.manifest, export_dir, out, EncodeOptions.of(), tok.precision, None)
    out.with_name(f".{out.name}.progress.json").write_text(json.dumps({**plan.signature, "done": 1, "written": 1}))
    partial_path(out).symlink_to(victim)
    with pytest.raises(VqtoolError, match=r"codes\.npy\.partial: is a link, not a file vqtool wrote"):
        tok.encode_files(images, out, log=lambda _: None, resume=True)
    assert victim.read_text() == "kept"
    partial_path(out).unlink()
    partial_path(out).write_bytes(b"\x93NUMPY\x01\x00\x76\x00{'descr': ('<u1'" + b" " * 100 + b"\n")
    with pytest.raises(VqtoolError, match=r"codes\.npy\.partial: is damaged"):
        tok.encode_files(images, out, log=lambda _: None, resume=True)


def test_parity_and_bench_wait_for_no_one_writing_the_export(export_copy: Path) -> None:
    """parity.json is read, merged and written again, and bench.json replaced: neither while another run (an export
    replacing the graphs, another parity) holds the export's lock."""
    from vqtool.bench.report import run_bench
    from vqtool.export.parity import check_export
    from vqtool.formats.lock import OutputLock

    record = (export_copy / "parity.json").read_bytes()
    with OutputLock(export_copy):
        busy = rf"export: another vqtool run is writing this output \(pid {os.getpid()}"
        with pytest.raises(VqtoolError, match=busy):
            check_export(export_copy, backends=("onnxruntime",), log=lambda _: None)
        with pytest.raises(VqtoolError, match=busy):
            run_bench(export_copy, batch_sizes=(1,), backends=("onnxruntime",), seconds=0.01, log=lambda _: None)
    assert (export_copy / "parity.json").read_bytes() == record and not (export_copy / "bench.json").exists()


def test_bench_replaces_no_file_it_did_not_write(export_dir: Path, tmp_path: Path) -> None:
    from vqtool.bench.report import run_bench

    mine = tmp_path / "results.json"
    mine.write_text('{"the": "user\'s"}')
    with pytest.raises(VqtoolError, match=r"results\.json: is not a bench record written by vqtool"):
        run_bench(export_dir, out=mine, log=lambda _: None)
    assert mine.read_text() == '{"the": "user\'s"}'
    # A record bench wrote before bench.json named its format is bench's to replace.
    mine.write_text(json.dumps({"cpu": "earlier", "cpu_count": 2, "model_only": []}))
    run_bench(export_dir, out=mine, batch_sizes=(1,), backends=("onnxruntime",), seconds=0.01, log=lambda _: None)
    assert json.loads(mine.read_text())["format"] == "vqtool.bench"


def test_an_export_replaces_only_what_an_earlier_export_wrote(export_dir: Path, tmp_path: Path) -> None:
    from vqtool.formats.outputs import check_export_target, replace_export

    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("the user's")
    with pytest.raises(VqtoolError, match="holds no vqtool export"):
        check_export_target(user, overwrite=True)
    earlier = tmp_path / "export"
    shutil.copytree(export_dir, earlier)
    (earlier / "notes.txt").write_text("the user's")
    with pytest.raises(VqtoolError, match="holds an export; pass --overwrite"):
        check_export_target(earlier, overwrite=False)
    check_export_target(earlier, overwrite=True)
    staging = tmp_path / "staging"
    staging.mkdir()
    manifest = json.loads((export_dir / "manifest.json").read_text())
    manifest["graphs"] = {k: v for k, v in manifest["graphs"].items() if k in ("encoder", "decoder")}
    (staging / "manifest.json").write_text(json.dumps(manifest))
    for name in ("encoder.onnx", "decoder.onnx", "model.pt", "parity.json"):
        shutil.copy(export_dir / name, staging / name)
    replace_export(staging, earlier)
    assert sorted(p.name for p in earlier.iterdir()) == [
        "decoder.onnx",
        "encoder.onnx",
        "manifest.json",
        "model.pt",
        "notes.txt",
        "parity.json",
    ]
    assert not staging.exists()
    # A file of the user's that shares its name with one the new export writes stops the replacement before any
    # file moves: the earlier export stands, and the user's file with it.
    (earlier / "encoder.fp16.onnx").write_text("the user's")
    staging.mkdir()
    for name in ("manifest.json", "encoder.onnx", "decoder.onnx", "model.pt", "encoder.fp16.onnx"):
        shutil.copy(export_dir / name, staging / name)
    before = {p.name: p.read_bytes() for p in earlier.iterdir()}
    with pytest.raises(VqtoolError, match=r"encoder\.fp16\.onnx: is not part of the export there"):
        replace_export(staging, earlier)
    assert {p.name: p.read_bytes() for p in earlier.iterdir()} == before
    # ONNX Runtime's TensorRT engine cache is the export's own folder: replaced with it, never in the way.
    (earlier / "encoder.fp16.onnx").unlink()
    (earlier / "ort_trt_cache").mkdir()
    (earlier / "ort_trt_cache" / "old.engine").write_text("built from the earlier graphs")
    (staging / "ort_trt_cache").mkdir()
    (staging / "ort_trt_cache" / "new.engine").write_text("built from these graphs")
    replace_export(staging, earlier)
    assert [p.name for p in (earlier / "ort_trt_cache").iterdir()] == ["new.engine"]


def test_export_refuses_a_folder_it_did_not_make(trained_checkpoint: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("the user's")
    one_error_line(run_cli("export", str(trained_checkpoint), "--out", str(folder)), "holds no vqtool export")
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


# ---- inputs checked before the work ------------------------------------------------------------------------------


def test_float_parquet_codes_and_oversized_grids_are_refused_before_any_output(
    export_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    import vqtool
    from vqtool.formats.codes_parquet import METADATA_KEY

    tok = vqtool.load(export_dir)
    meta = {"format": "vqtool.codes", "grid": [2, 2], "codes": tok.num_codes, "dtype": "uint8"}
    meta |= {"manifest_sha256": "", "checkpoint_sha256": tok.manifest.checkpoint_sha256}
    schema = pa.schema(
        [("key", pa.string()), ("codes", pa.list_(pa.float32())), ("height", pa.int32()), ("width", pa.int32())],
        metadata={METADATA_KEY: json.dumps(meta).encode()},
    )
    rows = [["a"], [[1.5, float("nan"), 2.0, 3.0]], [2], [2]]
    pq.write_table(
        pa.Table.from_arrays([pa.array(c, t.type) for c, t in zip(rows, schema, strict=True)], schema=schema),
        tmp_path / "float.parquet",
    )
    with pytest.raises(VqtoolError, match="must hold lists of integers"):
        tok.decode_file(tmp_path / "float.parquet", tmp_path / "o1", log=lambda _: None)
    # Integer codes with an empty cell: pyarrow would hand it over as NaN in a float array.
    schema = schema.set(1, pa.field("codes", pa.list_(pa.uint8())))
    rows[1] = [[1, None, 2, 3]]
    table = pa.Table.from_arrays([pa.array(c, t.type) for c, t in zip(rows, schema, strict=True)], schema=schema)
    pq.write_table(table, tmp_path / "null.parquet")
    assert table.column("codes").combine_chunks().flatten().to_numpy(zero_copy_only=False).dtype == np.float64
    with pytest.raises(VqtoolError, match=r"null\.parquet: a row's codes hold empty \(null\) cells"):
        tok.decode_file(tmp_path / "null.parquet", tmp_path / "o1", log=lambda _: None)
    np.save(tmp_path / "huge.npy", np.zeros((1, 2000, 2000), np.uint8))
    with pytest.raises(VqtoolError, match="2000x2000 codes decode to 32000x32000 images, over the limit"):
        tok.decode_file(tmp_path / "huge.npy", tmp_path / "o2", log=lambda _: None)
    from vqtool.pipeline import decode

    monkeypatch.setattr(decode, "available_memory", lambda: 1024)
    with pytest.raises(VqtoolError, match="more than the 0.0 GiB available"):
        tok.decode(np.zeros((1, 64, 64), np.uint8))
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_a_parquet_output_without_pyarrow_is_refused_before_any_image_is_read(
    export_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import vqtool

    images = _small_pngs(tmp_path / "images", 2, seed=6)
    tok = vqtool.load(export_dir)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(VqtoolError, match=r"pip install 'vqtool\[ray\]'"):
        tok.encode_files(images, tmp_path / "codes.parquet", log=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


# ---- a full disk -------------------------------------------------------------------------------------------------


def _can_mount_tmpfs(where: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {where}"], capture_output=True, timeout=30
    )
    return probe.returncode == 0


def test_a_full_disk_is_one_line_and_loses_nothing(export_dir: Path, tmp_path: Path) -> None:
    """A 64 KiB tmpfs, in a mount namespace of the test's own, filled but for one page: the lock fits, the codes
    do not. The earlier codes there stay as they were."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _can_mount_tmpfs(disk):
        pytest.skip("no user namespace here to mount a small tmpfs in")
    _small_pngs(tmp_path / "images", 3, seed=7)
    encode = [sys.executable, "-m", "vqtool", "encode", str(tmp_path / "images"), "--model", str(export_dir)]
    script = f"""
        mount -t tmpfs -o size=64k tmpfs {disk} || exit 9
        printf old > {disk}/codes.npy && printf '{{"format": "vqtool.codes"}}' > {disk}/codes.json
        dd if=/dev/zero of={disk}/filler bs=4k count=64 2>/dev/null
        truncate -s -4096 {disk}/filler
        {" ".join(encode)} --out {disk}/codes.npy --overwrite
        status=$?
        ls -A {disk}; cat {disk}/codes.npy
        exit $status
    """
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=env)
    one_error_line(result, f"{disk}/codes.npy", f"no space left on {disk}", "the codes need 140 bytes, 0 free")
    assert result.stdout.split() == ["codes.json", "codes.npy", "filler", "old"]


def test_past_the_file_size_limit_is_one_line_and_loses_nothing(export_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(9)
    for index in range(24):
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    out = tmp_path / "out" / "codes.npy"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    command = [sys.executable, "-m", "vqtool", "encode", str(folder), "--model", str(export_dir), "--no-resize"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [*command, "--out", str(out)], capture_output=True, text=True, env=env, preexec_fn=limit, timeout=300
    )
    one_error_line(result, str(out), "file-size limit", "the codes need 6,272 bytes")
    assert [p.name for p in out.parent.iterdir()] == []


def test_malformed_files_from_others_are_one_line_before_any_output(
    export_dir: Path, trained_checkpoint: Path, tmp_path: Path
) -> None:
    """Each of these came as a traceback (or a half-written output) before: a Parquet image column that is a struct
    without bytes, a shard sidecar naming no NumPy type, a model folder's config nested past the parser's depth,
    a checkpoint whose training record holds text where numbers belong, a CIFAR batch that is a bare array, and
    `--out` naming the file system's root."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    import vqtool
    from vqtool.data.cifar import read_cifar_batch
    from vqtool.formats.lock import OutputLock
    from vqtool.model.checkpoint import CheckpointError, load_checkpoint
    from vqtool.model.importing import import_model
    from vqtool.pipeline.shards import merge_shards

    tok = vqtool.load(export_dir)
    images = pa.array([{"path": "a.png"}], pa.struct([("path", pa.string())]))
    pq.write_table(pa.table({"image": images}), tmp_path / "structs.parquet")
    out = tmp_path / "codes" / "codes.npy"
    with pytest.raises(VqtoolError, match=r"structs\.parquet: column 'image' holds struct<path: string>, not image"):
        tok.encode_files(tmp_path / "structs.parquet", out, log=lambda _: None)
    assert not out.parent.exists() or not any(out.parent.iterdir())

    shard = tmp_path / "s0.npy"
    tok.encode_files(_small_pngs(tmp_path / "images", 2, seed=8), shard, log=lambda _: None)
    sidecar = json.loads(shard.with_suffix(".json").read_text())
    shard.with_suffix(".json").write_text(json.dumps({**sidecar, "dtype": "no-such-type"}))
    with pytest.raises(VqtoolError, match="'dtype' must be one of uint8, uint16, uint32"):
        merge_shards([shard], tmp_path / "merged.npy")

    (tmp_path / "deep").mkdir()
    (tmp_path / "deep" / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(VqtoolError, match="config.json"):
        import_model(tmp_path / "deep", tmp_path / "deep.pt", log=lambda _: None)

    payload = torch.load(trained_checkpoint, weights_only=True)
    payload["train_config"] = {**payload["train_config"], "epochs": "ten"}
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"bad\.pt: its training record is damaged"):
        load_checkpoint(tmp_path / "bad.pt")

    with open(tmp_path / "data_batch_1", "wb") as handle:
        pickle.dump(np.zeros(3, np.uint8), handle)
    with pytest.raises(VqtoolError, match="data_batch_1: not a CIFAR-10 python batch"):
        read_cifar_batch(tmp_path / "data_batch_1")

    with pytest.raises(VqtoolError, match="the file system's root"):
        OutputLock("/")
    with pytest.raises(VqtoolError, match=r"codes are written as \.npy"):
        tok.encode_files(tmp_path / "images", Path("/"), log=lambda _: None)
    here = os.getcwd()
    try:
        os.chdir(tmp_path / "images")
        assert OutputLock(".").path == tmp_path / ".images.lock"  # beside the folder, wherever the run started
    finally:
        os.chdir(here)


def test_a_stored_ray_block_with_rows_of_another_run_is_dropped_not_trusted(tmp_path: Path) -> None:
    """A resumed Ray run joins the blocks in its staging folder; one whose rows lie outside this run's (damaged, or
    left by hand) is removed and its rows run again, rather than ending the join with an IndexError."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vqtool.ray.engine import _parts

    def block(name: str, index: list[int]) -> None:
        count = len(index)
        codes = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(count * 4, np.uint8)), 4)
        columns = {"index": pa.array(index, pa.int64()), "codes": codes, "resized": [False] * count}
        columns |= {"reason": [""] * count, "name": ["x"] * count, "runtime": ["onnxruntime"] * count}
        pq.write_table(pa.table(columns), tmp_path / name)

    block("rows-000000000000-2.parquet", [0, 1])
    block("rows-000000000002-2.parquet", [2, 5])  # row 5 of a run of 4
    parts = list(_parts(tmp_path, rows=4, cells=4))
    assert [list(part["index"]) for part in parts] == [[0, 1]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows-000000000000-2.parquet"]

"""TensorRT: the code is type-checked against the real API; without TensorRT, --trt fails in one sentence.

The build/run tests at the bottom need a GPU with TensorRT and are skipped (with the reason) elsewhere.
Nothing here mocks TensorRT: a mock would prove nothing about the real library.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, run_cli
from tests.trt_stubs import repaired_stubs, stubs_installed
from vqtool.errors import VqtoolError
from vqtool.runtime.tensorrt import EngineMetadata, GpuIdentity, check_engine_matches

TRT_MODULES = ["export/tensorrt.py", "vqtool/runtime/tensorrt.py"]


def _mypy(paths: list[str], stubs: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MYPYPATH": str(stubs)}
    # The modules they import are read for their types but not reported on (silent): checking the whole import
    # graph strictly took a minute, and what this guards is the calls into TensorRT, which stay fully checked.
    command = [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--follow-imports=silent", *paths]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not stubs_installed():
        message = "tensorrt-stubs is not installed: pip install --no-deps tensorrt-stubs (scripts/test.sh does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return repaired_stubs(tmp_path_factory.mktemp("trt-stubs"))


def test_tensorrt_code_type_checks_against_the_stubs(stubs: Path) -> None:
    result = _mypy(TRT_MODULES, stubs)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_type_check_would_catch_a_wrong_call(stubs: Path, tmp_path: Path) -> None:
    """Canary: if the stubs stopped being read, every TensorRT call would be Any and pass unchecked."""
    bad = tmp_path / "bad_build.py"
    bad.write_text(
        "import tensorrt as trt\n"
        "from pathlib import Path\n"
        "def build(path: Path) -> None:\n"
        "    builder = trt.Builder(trt.Logger(trt.Logger.WARNING))\n"
        "    config = builder.create_builder_config()\n"
        "    config.clear_flagz(trt.BuilderFlag.TF32)\n"
        "    parser = trt.OnnxParser(builder.create_network(0), trt.Logger())\n"
        "    parser.parse_from_file(path)\n"
    )
    result = _mypy([str(bad)], stubs)
    assert result.returncode != 0
    assert "clear_flagz" in result.stdout and "parse_from_file" in result.stdout


def test_trt_export_without_tensorrt_fails_in_one_sentence_before_any_work(
    trained_checkpoint: Path, tmp_path: Path
) -> None:
    if _trt_available():
        pytest.skip("TensorRT is installed here, so --trt does not fail")
    result = run_cli("export", str(trained_checkpoint), "--out", str(tmp_path / "model"), "--trt")
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: TensorRT")
    assert "pip install 'vqtool[trt]'" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_tensorrt_backend_without_tensorrt_says_what_is_missing(
    export_dir: Path, mixed_folder: Path, tmp_path: Path
) -> None:
    if _trt_available():
        pytest.skip("TensorRT is installed here")
    result = run_cli(
        "encode",
        str(mixed_folder),
        "--model",
        str(export_dir),
        "--out",
        str(tmp_path / "c.npy"),
        "--backend",
        "tensorrt",
    )
    assert result.returncode == 1 and "TensorRT" in result.stderr and "pip install" in result.stderr
    assert not (tmp_path / "c.npy").exists()


def _trt_available() -> bool:
    from vqtool.runtime.tensorrt import import_tensorrt

    try:
        import_tensorrt()
    except VqtoolError:
        return False
    return True


def _meta(**changes: object) -> EngineMetadata:
    base = dict(
        tensorrt_version="10.13.0",
        gpu_name="NVIDIA H100",
        compute_capability="9.0",
        precision="fp32",
        input="images",
        output="codes",
        profile_min=[1, 32, 32, 3],
        profile_opt=[64, 32, 32, 3],
        profile_max=[256, 32, 32, 3],
        onnx_file="encoder.onnx",
        onnx_sha256="a",
        engine_sha256="b",
        workspace_bytes=1 << 30,
        strongly_typed=True,
        tf32=False,
    )
    return EngineMetadata(**{**base, **changes})  # type: ignore[arg-type]


def test_engines_from_another_tensorrt_or_gpu_are_refused() -> None:
    here = GpuIdentity("NVIDIA H100", "9.0")
    check_engine_matches(_meta(), "10.13.0", here, Path("e.engine"))
    with pytest.raises(VqtoolError, match="built with TensorRT 10.13.0, but TensorRT 10.14.1 is installed"):
        check_engine_matches(_meta(), "10.14.1", here, Path("e.engine"))
    with pytest.raises(VqtoolError, match="built for NVIDIA H100 .* this GPU is NVIDIA A100"):
        check_engine_matches(_meta(), "10.13.0", GpuIdentity("NVIDIA A100", "8.0"), Path("e.engine"))


# ---- on a GPU machine with TensorRT -------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_engines_build_and_match_pytorch(trained_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    result = run_cli(
        "export",
        str(trained_checkpoint),
        "--out",
        str(out),
        "--fp16",
        "--trt",
        "--timing-cache",
        str(tmp_path / "timing.cache"),
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "parity.json").read_text())
    trt_reports = [r for r in report["reports"] if r["runtime"] == "tensorrt"]
    assert {r["precision"] for r in trt_reports} == {"fp32", "fp16"} and all(r["passed"] for r in trt_reports)
    assert (tmp_path / "timing.cache").stat().st_size > 0
    meta = json.loads((out / "encoder.engine.json").read_text())
    assert meta["strongly_typed"] and not meta["tf32"] and meta["profile_max"][0] == 256


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_engine_with_a_changed_build_record_is_refused(
    trained_checkpoint: Path, tmp_path: Path, mixed_folder: Path
) -> None:
    out = tmp_path / "model"
    cache = ("--timing-cache", str(tmp_path / "timing.cache"))  # never the user's own cache
    assert run_cli("export", str(trained_checkpoint), "--out", str(out), "--trt", *cache, timeout=1800).returncode == 0
    record = out / "encoder.engine.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "tensorrt_version": "9.0.0"}))
    result = run_cli(
        "encode", str(mixed_folder), "--model", str(out), "--out", str(tmp_path / "c.npy"), "--backend", "tensorrt"
    )
    assert result.returncode == 1 and "rebuild" in result.stderr
    codes = run_cli("encode", str(mixed_folder), "--model", str(out), "--out", str(tmp_path / "d.npy"))
    assert codes.returncode == 0 and np.load(tmp_path / "d.npy").shape == (8, 2, 2)


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_engines_build_against_an_existing_a_foreign_and_a_corrupt_timing_cache(
    trained_checkpoint: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "timing.cache"

    def export(name: str) -> str:
        args = ("export", str(trained_checkpoint), "--out", str(tmp_path / name), "--trt", "--timing-cache", str(cache))
        result = run_cli(*args, timeout=1800)
        assert result.returncode == 0, result.stderr
        assert json.loads((tmp_path / name / "parity.json").read_text())["passed"]
        return result.stderr

    export("fresh")
    built = cache.read_bytes()
    assert built, "the first build wrote no timing cache"
    assert "cannot use this timing cache" not in export("existing")  # reused as it is
    # Another GPU or TensorRT version: same magic, other device and version fields, which TensorRT checks.
    foreign = bytearray(built)
    for at in range(8, min(64, len(foreign))):
        foreign[at] ^= 0x5A
    cache.write_bytes(bytes(foreign))
    assert "cannot use this timing cache" in export("foreign")
    assert cache.read_bytes() != bytes(foreign) and len(cache.read_bytes()) > 0  # replaced by a usable cache
    cache.write_bytes(b"not a timing cache")
    assert "cannot use this timing cache" in export("corrupt")
    assert cache.read_bytes() != b"not a timing cache"

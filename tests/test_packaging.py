"""One import name: vqtool's training and export code never collides with a user's own train.py or export/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, run_cli


def _user_project(root: Path) -> Path:
    """An ML project as most are laid out: its own train.py and export/ package, both of which would break us."""
    root.mkdir()
    (root / "train.py").write_text("raise SystemExit('the user train.py was imported')\n")
    (root / "export").mkdir()
    (root / "export" / "__init__.py").write_text("raise SystemExit('the user export package was imported')\n")
    return root


def test_cli_runs_from_a_folder_with_its_own_train_py_and_export(trained_checkpoint: Path, tmp_path: Path) -> None:
    project = _user_project(tmp_path / "project")
    # The fault must bite: from this folder, a top-level `train` is the user's script.
    shadowed = subprocess.run(
        [sys.executable, "-c", "import train"], cwd=project, capture_output=True, text=True, timeout=60
    )
    assert "the user train.py was imported" in shadowed.stderr
    trained = run_cli(
        "train", "--steps", "2", "--batch-size", "8", "--out", str(tmp_path / "run"), "--device", "cpu", cwd=project
    )
    assert trained.returncode == 0, trained.stderr
    exported = run_cli("export", str(trained_checkpoint), "--out", str(tmp_path / "model"), cwd=project)
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "model" / "encoder.onnx").is_file()


def test_the_install_puts_only_vqtool_at_the_top_level(tmp_path: Path) -> None:
    probe = (
        "import importlib.util as u, vqtool.train.loop, vqtool.export.graphs; "
        "print(u.find_spec('train'), u.find_spec('export'))"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["None", "None"]


def test_gpu_extras_install_one_consistent_cuda_stack() -> None:
    """Each TensorRT extra names one CUDA major for TensorRT, cuda-python and onnxruntime-gpu (whose TensorRT
    provider links TensorRT 10), instead of the unsuffixed `tensorrt`, which now resolves to CUDA 13 and TensorRT 11."""
    import tomllib

    from tests.conftest import REPO

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    stacks = {"trt": ("cu13", "<14", ">=1.27"), "trt-cu12": ("cu12", "<13", "<1.27")}
    for extra, (cuda, cuda_python, ort) in stacks.items():
        wanted = {name.split(">")[0].split("<")[0]: name for name in extras[extra]}
        assert set(wanted) == {f"tensorrt-{cuda}", "cuda-python", "onnxruntime-gpu"}, extra
        assert wanted[f"tensorrt-{cuda}"].endswith(",<11") and cuda_python in wanted["cuda-python"], extra
        assert ort in wanted["onnxruntime-gpu"], extra


def test_the_wheel_holds_every_module_and_the_type_marker(tmp_path: Path) -> None:
    """A subpackage missing from pyproject's package list installs editable but not from the wheel."""
    import zipfile

    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            str(REPO),
            "-w",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("vqtool-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"vqtool/{p.relative_to(REPO / 'vqtool').as_posix()}" for p in (REPO / "vqtool").rglob("*.py")}
    expected |= {
        f"vqtool/{folder}/{p.relative_to(REPO / folder).as_posix()}"
        for folder in ("train", "export")
        for p in (REPO / folder).rglob("*.py")
    }
    assert expected - names == set()
    assert "vqtool/py.typed" in names

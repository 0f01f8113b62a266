"""Shared fixtures: real image files, and one model trained for a few hundred steps per session."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# Trained, not freshly initialised: an untrained codebook hides near-ties.
PARITY_TRAIN_STEPS = 300


def photo(name: str) -> Image.Image:
    with Image.open(files("skimage.data") / name) as image:
        image.load()
        return image


def write_mixed_folder(root: Path) -> list[Path]:
    """Real photographs in every supported format and the awkward modes (grey, RGBA, palette, 16-bit)."""
    (root / "sub").mkdir(parents=True, exist_ok=True)
    moon16 = np.asarray(photo("moon.png")).astype(np.uint16) * 257
    made = {
        "astronaut.png": photo("astronaut.png"),
        "camera_grey.png": photo("camera.png"),
        "horse_rgba.png": photo("horse.png"),
        "coffee_palette.png": photo("coffee.png").convert("P", palette=Image.Palette.ADAPTIVE),
        "moon16.png": Image.fromarray(moon16),
        "moto.bmp": photo("motorcycle_left.png"),
        "sub/chelsea.jpg": photo("chelsea.png"),
        "sub/rocket.webp": photo("rocket.jpg"),
    }
    for name, image in made.items():
        image.save(root / name)
    return sorted((root / n for n in made), key=lambda p: p.as_posix())


def photo_crops(count: int, seed: int = 0) -> list[np.ndarray]:
    """`count` crops of various sizes (larger and smaller than 32, not square) of real photographs."""
    rng = np.random.default_rng(seed)
    photos = [np.asarray(photo(name).convert("RGB")) for name in ("astronaut.png", "chelsea.png", "coffee.png")]
    crops = []
    for index in range(count):
        source = photos[index % len(photos)]
        height, width = int(rng.integers(24, 90)), int(rng.integers(24, 90))
        top, left = int(rng.integers(0, source.shape[0] - height)), int(rng.integers(0, source.shape[1] - width))
        crops.append(source[top : top + height, left : left + width])
    return crops


def write_photo_folder(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` photo crops as PNG, JPEG and WebP files in two subfolders of `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, pixels in enumerate(photo_crops(count, seed)):
        suffix = (".png", ".jpg", ".webp")[index % 3]
        paths.append(folder / f"sub{index % 2}" / f"img{index:04d}{suffix}")
        paths[-1].parent.mkdir(exist_ok=True)
        Image.fromarray(pixels).save(paths[-1], quality=95)
    return paths


def interrupted_then_resumed(monkeypatch: pytest.MonkeyPatch, at_step: int, train: Any, resume: Any) -> Any:
    """Run `train()` as if Ctrl-C came right after step `at_step` (the loop's own stop path), then `resume()`;
    returns what resume() returns."""
    from vqtool.train import loop

    step = loop._Run.train_step

    def stop_there(run: Any, stop_requested: bool) -> Any:
        losses, stopping = step(run, stop_requested)
        return losses, stopping or run.step == at_step

    with monkeypatch.context() as patch:
        patch.setattr(loop._Run, "train_step", stop_there)
        part = train()
    assert part.interrupted and part.steps == at_step
    return resume()


def _cli_env(env: dict[str, str] | None) -> dict[str, str]:
    # The checkout after whatever PYTHONPATH already holds (scripts/gpu-check.sh lays out an install there).
    paths = [os.environ.get("PYTHONPATH", ""), str(REPO)]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), **(env or {})}


def run_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """`vqtool ARGS` in a real subprocess, as a user's shell would run it."""
    return subprocess.run(
        [sys.executable, "-m", "vqtool", *args],
        cwd=cwd,
        env=_cli_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def in_subprocess(code: str) -> object:
    """Run `code` in a fresh Python and return the JSON it prints last.

    OpenVINO stays out of the test process: a process that has run OpenVINO segfaults when it later forks
    PyTorch DataLoader workers (torch 2.13, OpenVINO 2026.4), which the streaming tests do.
    """
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(REPO)}
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def one_error_line(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """The run failed with exit 1 and ended on exactly one `error:` line, holding every fragment; no traceback."""
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def start_cli(*args: str) -> subprocess.Popen[str]:
    """`vqtool ARGS` started in a real subprocess without waiting for it, to interrupt it."""
    command = [sys.executable, "-m", "vqtool", *args]
    return subprocess.Popen(command, env=_cli_env(None), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="session")
def mixed_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    write_mixed_folder(root)
    return root


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], Path]) -> Path:
    """`build(folder)`'s result, made once per test run: under pytest-xdist the first worker to ask builds it in
    the run's shared temporary folder while the others wait on a file lock, then all of them use it."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        return build(tmp_path_factory.mktemp(name))
    from filelock import FileLock

    folder = tmp_path_factory.getbasetemp().parent / name
    record = folder.with_suffix(".done")
    with FileLock(f"{folder}.lock"):
        if not record.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            record.write_text(str(build(folder).relative_to(folder)))
    return folder / record.read_text()


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference model (K = D = 256) trained for a few hundred steps on the embedded data."""

    def train(run_dir: Path) -> Path:
        from vqtool.model.config import ModelConfig, TrainConfig
        from vqtool.train.data.memory import default_training_set
        from vqtool.train.loop import fit

        config = TrainConfig(steps=PARITY_TRAIN_STEPS, batch_size=64, seed=1, device="cpu")
        return fit(
            ModelConfig(), config, default_training_set(32), run_dir, data_source=None, show_progress=False
        ).checkpoint

    return built_once(tmp_path_factory, "run", train)


@pytest.fixture(scope="session")
def export_dir(trained_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference model exported in FP32 and FP16. Not INT8: on its 2 x 2 grid a changed code repaints a quarter
    of the image, so its INT8 codes miss the bounded contract's decode limit and export refuses them."""

    def export(folder: Path) -> Path:
        from vqtool.export.pipeline import export_model

        export_model(trained_checkpoint, folder / "model", fp16=True, log=lambda _: None)
        return folder / "model"

    return built_once(tmp_path_factory, "exports", export)


# A small model with every option of the family at once (factor 4: an 8 x 8 grid of 64 codes, one residual block,
# codes looked up in 8 l2-normalised dimensions), the one whose INT8 encoder the tests publish.
SMALL = {"codes": 64, "dim": 32, "channels": (16, 32, 64)}
EVERYTHING = {"downsample": 4, "res_blocks": 1, "lookup_dim": 8, "l2_codes": True}


def train_small(folder: Path, options: dict[str, object], steps: int) -> Path:
    """A SMALL model with `options`, trained `steps` steps on the embedded data at 32 x 32."""
    from vqtool.model.config import ModelConfig, TrainConfig
    from vqtool.train.data.memory import default_training_set
    from vqtool.train.loop import fit

    config = ModelConfig(**{**SMALL, **options})
    train = TrainConfig(steps=steps, batch_size=32, seed=3, device="cpu", restart_dead=20)
    photos = default_training_set(32)
    return fit(config, train, photos, folder, data_source=None, show_progress=False, log_epochs=False).checkpoint


@pytest.fixture(scope="session")
def int8_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The EVERYTHING model exported in FP32, FP16 and INT8 (published under the bounded contract)."""

    def export(folder: Path) -> Path:
        from vqtool.export.pipeline import export_model

        checkpoint = train_small(folder / "run", EVERYTHING, steps=120)
        export_model(checkpoint, folder / "export", fp16=True, int8=True, calibration_count=512, log=lambda _: None)
        return folder / "export"

    return built_once(tmp_path_factory, "int8-exports", export)


def _gpu_missing() -> str | None:
    try:
        import torch
    except ModuleNotFoundError:
        return "PyTorch is not installed"
    return None if torch.cuda.is_available() else "no CUDA GPU on this machine"


def _tensorrt_missing() -> str | None:
    from vqtool.errors import VqtoolError
    from vqtool.runtime.tensorrt import import_tensorrt

    try:
        import_tensorrt()
    except VqtoolError as exc:
        return str(exc)
    return None


# The longest files, longest first (worker-seconds, measured with --durations on 2 cores). scripts/test.sh runs
# pytest-xdist with --dist loadfile --no-loadscope-reorder: each worker takes the next file in collection order as
# it finishes one, so the long files start at once and the short ones fill in at the end. The first two share no
# fixture with each other, so neither worker waits while the other trains the reference model. A file not named
# here runs after them; a stale order costs time, never a result.
LONGEST_FIRST = (
    "test_import.py",
    "test_latents.py",
    "test_training.py",
    "test_family.py",
    "test_ray.py",
    "test_originals.py",
    "test_import_int8.py",
    "test_scale.py",
    "test_fuzz.py",
    "test_cli.py",
    "test_safety.py",
    "test_streaming.py",
    "test_int8.py",
    "test_openvino.py",
    "test_packaging.py",
)


def _longest_first(item: pytest.Item) -> int:
    name = item.path.name
    return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest files first (a stable sort: each file's tests keep their order); GPU and TensorRT tests run only
    where those exist, and say why they were skipped elsewhere."""
    items.sort(key=_longest_first)
    reasons = {"gpu": _gpu_missing(), "tensorrt": _tensorrt_missing()}
    for item in items:
        for marker, reason in reasons.items():
            if reason and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=f"{marker}: {reason}"))

"""The Python API: vqtool.load(...).encode/decode on arrays, tensors and files, against the CLI and PyTorch."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import vqtool
from tests.conftest import REPO, photo_crops, run_cli, write_mixed_folder
from vqtool.cli.common import Crop, Preset
from vqtool.cli.importing import Quantizer
from vqtool.precisions import PRECISIONS, Precision
from vqtool.runtime import tensors
from vqtool.runtime.base import BACKENDS, DEVICES, Backend, Device


def photos(count: int, seed: int = 0) -> np.ndarray:
    """count x 32 x 32 x 3 crops of real photographs, at the model's size."""
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(c).resize((32, 32))) for c in photo_crops(count, seed)])


def python_block(document: str, heading: str) -> str:
    """The first python block under `heading` in `document`, as written."""
    text = (REPO / document).read_text()
    section = text[text.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL)[1]  # type: ignore[index]


def run_example(code: str, export_dir: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run `code` as a script in a folder holding the quick tour's runs/run-001/export, without PyTorch's help."""
    (tmp_path / "runs" / "run-001").mkdir(parents=True)
    shutil.copytree(export_dir, tmp_path / "runs" / "run-001" / "export")
    script = tmp_path / "example.py"
    script.write_text(code)
    return subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )


def test_the_readme_example_runs_as_written(export_dir: Path, tmp_path: Path) -> None:
    code = python_block("README.md", "## A quick tour")
    assert len(code.strip().splitlines()) <= 5
    result = run_example(code, export_dir, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "(8, 2, 2) (8, 32, 32, 3)" in result.stdout and "CPUExecutionProvider" in result.stdout


def test_the_api_page_example_runs_as_written(export_dir: Path, tmp_path: Path) -> None:
    result = run_example(python_block("docs/api.md", "# Python API"), export_dir, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "CPUExecutionProvider" in result.stdout
    assert "8 images encoded" in result.stdout
    assert "codes must lie in 0..255" in result.stdout  # the VqtoolError the example provokes
    assert len(list((tmp_path / "recon").glob("*.png"))) == 8


def test_api_codes_equal_the_cli_codes_byte_for_byte(export_dir: Path, mixed_folder: Path, tmp_path: Path) -> None:
    cli = run_cli("encode", str(mixed_folder), "--model", str(export_dir), "--out", str(tmp_path / "cli.npy"))
    assert cli.returncode == 0, cli.stderr
    tok = vqtool.load(export_dir)
    notes: list[str] = []
    result = tok.encode_files([mixed_folder], out=tmp_path / "api.npy", log=notes.append)
    assert (tmp_path / "api.npy").read_bytes() == (tmp_path / "cli.npy").read_bytes()
    assert (tmp_path / "api.json").read_text() == (tmp_path / "cli.json").read_text()
    assert result.count == 8 and any("encoding 8 images in fp32" in n for n in notes)
    # In memory, from the same files: the same codes, in the dtype the CLI writes.
    files = sorted(str(p) for p in mixed_folder.rglob("*") if p.is_file())
    in_memory = tok.encode(files)
    cli_codes = np.load(tmp_path / "cli.npy")
    assert in_memory.dtype == cli_codes.dtype == np.uint8
    np.testing.assert_array_equal(in_memory, cli_codes)
    # And decoding: the API's images are the PNGs the CLI writes.
    decoded = run_cli("decode", str(tmp_path / "cli.npy"), "--model", str(export_dir), "--out", str(tmp_path / "r"))
    assert decoded.returncode == 0, decoded.stderr
    from PIL import Image

    pngs = np.stack([np.asarray(Image.open(p)) for p in sorted((tmp_path / "r").glob("*.png"))])
    np.testing.assert_array_equal(tok.decode(cli_codes), pngs)


def test_encode_and_decode_match_pytorch(export_dir: Path) -> None:
    from vqtool.model.checkpoint import load_checkpoint
    from vqtool.model.vqvae import images_to_input, output_to_images

    images = photos(48, seed=5)
    tok = vqtool.load(export_dir)
    codes = tok.encode(images, batch_size=20)  # several graph calls, stitched together
    model = load_checkpoint(export_dir / "model.pt").model.eval()
    with torch.inference_mode():
        expected = model.encode(images_to_input(torch.from_numpy(images))).numpy()
        recon = output_to_images(model.decode(torch.from_numpy(codes).long())).numpy()
    # FP32 parity's rule: identical codes but for near-ties, which parity.json counts for this export.
    assert (codes == expected).mean() >= 0.99
    assert np.abs(tok.decode(codes).astype(int) - recon).max() <= 1
    assert tok.decode(codes[:0]).shape == (0, 32, 32, 3) and tok.encode(images[:0]).shape == (0, 2, 2)


def test_what_the_tokenizer_says_about_itself(export_dir: Path) -> None:
    tok = vqtool.load(export_dir)
    assert (tok.num_codes, tok.image_size, tok.downsample) == (256, 32, 16)
    assert tok.grid(64, 96) == (4, 6)
    assert (tok.backend, tok.provider, tok.precision) == ("onnxruntime", "CPUExecutionProvider", "fp32")
    # The provider is what ONNX Runtime really started, not what it lists (onnxruntime-gpu lists CUDA here).
    assert tok._encoder.runner.session.get_providers()[0] == tok.provider  # type: ignore[attr-defined]
    assert "ONNX Runtime" in tok.describe()
    with pytest.raises(vqtool.VqtoolError, match="not a multiple of the model's factor 16"):
        tok.grid(40, 32)
    assert tok.contract.name == "exact" and "codes under the exact contract" in tok.describe()
    fp16 = vqtool.load(export_dir, precision="fp16")
    assert fp16.precision == "fp16" and fp16.encode(photos(4)).dtype == np.uint8


def test_lists_sizes_and_resizing(export_dir: Path) -> None:
    tok = vqtool.load(export_dir)
    big = photos(3, seed=2)
    large = np.stack([np.kron(image, np.ones((2, 2, 1), dtype=np.uint8)) for image in big])  # 64 x 64
    # resize=True (the CLI's default) brings any size to the model's; a list may mix sizes.
    assert tok.encode(large).shape == (3, 2, 2)
    mixed = tok.encode([large[0], big[1]])
    np.testing.assert_array_equal(mixed, np.concatenate([tok.encode(large[:1]), tok.encode(big[1:2])]))
    # resize=False keeps multiples of the factor: a bigger grid.
    assert tok.encode(large, resize=False).shape == (3, 4, 4)
    with pytest.raises(vqtool.VqtoolError, match="share one size"):
        tok.encode([large[0], big[1]], resize=False)
    with pytest.raises(vqtool.VqtoolError, match="40x40 is not a multiple of the model's factor 16"):
        tok.encode(np.zeros((1, 40, 40, 3), np.uint8), resize=False)


def test_user_errors_are_one_vqtool_error_naming_the_file(export_dir: Path, tmp_path: Path) -> None:
    tok = vqtool.load(export_dir)
    images = photos(2)
    cases = [
        (lambda: tok.encode(images[0]), "for one image pass images\\[None\\]"),
        (lambda: tok.encode(images.astype(np.float32)), "must be uint8 N x H x W x 3"),
        (lambda: tok.encode("photo.png"), "use encode_files"),
        (lambda: tok.encode([images[0], 7]), "images\\[1\\] must be a path"),
        (lambda: tok.decode(np.full((1, 2, 2), 256)), "codes must lie in 0..255"),
        (lambda: tok.decode(np.full((1, 2, 2), -1)), "codes must lie in 0..255"),
        (lambda: tok.decode(np.zeros((1, 2, 2), np.float32)), "codes must be integers"),
        (lambda: tok.encode(images, batch_size=0), "batch_size must be at least 1"),
    ]
    for call, message in cases:
        with pytest.raises(vqtool.VqtoolError, match=message):
            call()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(vqtool.VqtoolError, match=re.escape(str(broken))):
        tok.encode([broken])
    with pytest.raises(vqtool.VqtoolError, match=re.escape(str(tmp_path / "nowhere"))):
        vqtool.load(tmp_path / "nowhere")
    # A graph changed after export is refused at load, naming it.
    tampered = tmp_path / "tampered"
    shutil.copytree(export_dir, tampered)
    with open(tampered / "decoder.onnx", "ab") as graph:
        graph.write(b"\0")
    with pytest.raises(vqtool.VqtoolError, match=r"decoder\.onnx: graph file does not match the checksum"):
        vqtool.load(tampered)
    with pytest.raises(vqtool.VqtoolError, match="unknown backend 'onnxrt'"):
        vqtool.load(export_dir, backend="onnxrt")


def test_torch_tensors_in_and_out(export_dir: Path) -> None:
    tok = vqtool.load(export_dir)
    images = photos(6, seed=3)
    tensor = torch.from_numpy(images)
    assert np.shares_memory(tensors.to_numpy(tensor), images)  # CPU tensors reach ONNX Runtime without a copy
    codes = tok.encode(tensor)
    assert isinstance(codes, torch.Tensor) and codes.dtype == torch.uint8
    np.testing.assert_array_equal(codes.numpy(), tok.encode(images))
    recon = tok.decode(codes.long())
    assert isinstance(recon, torch.Tensor) and recon.dtype == torch.uint8
    np.testing.assert_array_equal(recon.numpy(), tok.decode(codes.numpy()))
    assert isinstance(tok.encode([tensor[0], images[1]]), np.ndarray)  # a list gives an array


@pytest.mark.gpu
def test_cuda_tensors_stay_on_the_gpu(export_dir: Path) -> None:
    try:
        tok = vqtool.load(export_dir, device="cuda")
    except vqtool.VqtoolError as exc:  # a GPU, but ONNX Runtime's CPU build (as on the project's GPU machine)
        pytest.skip(f"ONNX Runtime cannot run on the GPU here: {exc}")
    images = photos(16, seed=4)
    codes = tok.encode(torch.from_numpy(images).cuda())
    assert codes.is_cuda and codes.dtype == torch.uint8
    np.testing.assert_array_equal(codes.cpu().numpy(), tok.encode(images))
    recon = tok.decode(codes)
    assert recon.is_cuda
    np.testing.assert_array_equal(recon.cpu().numpy(), tok.decode(codes.cpu().numpy()))


def test_one_tokenizer_serves_several_threads(export_dir: Path) -> None:
    tok = vqtool.load(export_dir)
    batches = [photos(16, seed=s) for s in range(8)]
    expected = [tok.encode(b) for b in batches]
    results: dict[int, np.ndarray] = {}

    def work(index: int) -> None:
        for _ in range(5):
            results[index] = tok.decode(tok.encode(batches[index]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, codes in enumerate(expected):
        np.testing.assert_array_equal(results[index], tok.decode(codes))


def test_the_api_runs_where_torch_is_not_installed(export_dir: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "blocker" / "torch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
    write_mixed_folder(tmp_path / "images")
    script = f"""
import sys
import numpy as np
import vqtool
tok = vqtool.load({str(export_dir)!r})
codes = tok.encode_files([{str(tmp_path / "images")!r}], out={str(tmp_path / "codes.npy")!r}, log=print)
again = tok.encode(sorted(str(p) for p in __import__("pathlib").Path({str(tmp_path / "images")!r}).rglob("*.*")))
assert (again == np.load({str(tmp_path / "codes.npy")!r})).all()
print(tok.decode(again).shape, "torch" in sys.modules)
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={"PYTHONPATH": f"{blocker.parent}:{REPO}", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("(8, 32, 32, 3) False")


def test_fixed_choices_are_typer_choices_refused_before_any_work(export_dir: Path, tmp_path: Path) -> None:
    assert [b.value for b in Backend] == list(BACKENDS)
    assert [d.value for d in Device] == list(DEVICES)
    assert [p.value for p in Precision] == list(PRECISIONS)
    from vqtool.images.fit import CROPS
    from vqtool.model.config import QUANTIZERS
    from vqtool.model.presets import PRESET_ALIASES, PRESETS

    assert [p.value for p in Preset] == [*PRESETS, *PRESET_ALIASES]  # a former name is still a choice
    assert [c.value for c in Crop] == list(CROPS) and [q.value for q in Quantizer] == list(QUANTIZERS)
    helped = run_cli("encode", "--help", env={"COLUMNS": "300"})
    assert "auto|onnxruntime|onnxruntime-trt|tensorrt|openvino|torch" in helped.stdout.replace(" ", "")
    assert "fp32|fp16|bf16|int8" in helped.stdout.replace(" ", "")
    for option, value in (("--backend", "onnxrt"), ("--device", "gpu"), ("--precision", "int4")):
        refused = run_cli(
            "encode", str(tmp_path), "--model", str(export_dir), "--out", str(tmp_path / "c.npy"), option, value
        )
        assert refused.returncode == 2 and "Invalid value" in refused.stderr, refused.stderr
        assert not (tmp_path / "c.npy").exists()
    refused = run_cli("train", "--preset", "f16")
    assert refused.returncode == 2 and "Invalid value" in refused.stderr

"""Latents in and out (`export --latents`): the interface diffusion pipelines use. Latent diffusion hands
`vqvae.decode` continuous latents that it quantises; Kandinsky decodes MoVQ's with `force_not_quantize=True`.
Both are built from diffusers' own VQModel with seeded weights, exported with their latent graphs, and compared
with the library's own `encode(x).latents` and `decode(latents)` on real photographs: MoVQ here, latent diffusion's
VQModel in tests/test_import.py's command-line test, which exports it with `--latents`. vqtool's own model exports
its latent graphs through the command line here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.conftest import in_subprocess, run_cli
from tests.test_import import SIZE, _model_input, _photos, make_vqmodel
from vqtool.images.quality import psnr


def _library(model: Any, images: np.ndarray, quantize: bool) -> tuple[np.ndarray, np.ndarray]:
    """The library's latents of `images` and its decode of them, as uint8 images."""
    with torch.no_grad():
        latents = model.encode(_model_input(images)).latents
        decoded = model.decode(latents, force_not_quantize=not quantize).sample
    pictures = ((decoded.permute(0, 2, 3, 1) + 1.0) * 127.5).clamp(0, 255).round().to(torch.uint8).numpy()
    return latents.numpy(), pictures


def check_latent_graphs(model: Any, export: Path, decode: str) -> None:
    """What `export --latents` of the library `model` must give: the latents its pipeline decodes as `decode`,
    unasked; FP32 latent graphs that passed parity (recorded in parity.json); and through the API, the library's
    `encode(x).latents` and its decode of them on real photographs, the codes path unchanged beside them.
    tests/test_import.py checks latent diffusion's VQModel (which quantises) with this, through the command line."""
    import vqtool
    from vqtool.formats.records import LatentReport

    assert json.loads((export / "manifest.json").read_text())["latent_decode"] == decode
    recorded = [LatentReport.from_dict(r) for r in json.loads((export / "parity.json").read_text())["latents"]]
    (fp32,) = [r for r in recorded if r.precision == "fp32"]
    assert fp32.passed and fp32.decode_psnr >= 50 and fp32.latent_error <= 1e-4

    images = _photos(12, seed=11)
    latents, pictures = _library(model, images, quantize=decode == "quantize")
    with vqtool.load(export, "onnxruntime", "cpu") as tok:
        ours = tok.encode_latents(images)
        assert ours.dtype == np.float32 and ours.shape == latents.shape
        assert np.abs(ours - latents).max() <= 1e-4 * np.abs(latents).max()
        decoded = tok.decode_latents(latents)
        assert psnr(pictures, decoded) >= 50
        # A torch tensor gives a torch tensor; the codes path is unchanged beside it.
        assert torch.equal(tok.decode_latents(torch.from_numpy(latents)), torch.from_numpy(decoded))
        assert tok.encode(images).shape == (12, 8, 8)
    # The other decode gives other pictures: which one runs matters, and the manifest says it.
    other = _library(model, images, quantize=decode != "quantize")[1]
    assert psnr(other, decoded) < 45


def test_movq_latent_graphs_decode_as_kandinsky_does_and_each_fp16_graph_is_judged_on_its_own(
    tmp_path: Path,
) -> None:
    from vqtool.export.pipeline import export_model
    from vqtool.model.importing import import_model

    model = make_vqmodel(tmp_path / "vq", norm_type="spatial", mid_block_add_attention=False)
    import_model(tmp_path / "vq", tmp_path / "vq.pt", log=lambda _: None)
    result = export_model(tmp_path / "vq.pt", tmp_path / "export", latents=True, fp16=True, log=lambda _: None)
    # FP16's latent graphs are published where they meet their rule, and left out where they miss it, each graph
    # on its own.
    for report in [r for r in result.verification.latents if r.precision == "fp16"]:
        for role in ("encoder_latents", "decoder_latents"):
            assert (f"{role}.fp16" in result.manifest.graphs) == (not report.failures_of(role))
            assert (tmp_path / "export" / f"{role}.fp16.onnx").exists() == (not report.failures_of(role))
    recorded = json.loads((tmp_path / "export" / "parity.json").read_text())["latents"]
    assert {r["precision"] for r in recorded} == {r.precision for r in result.verification.latents}
    check_latent_graphs(model, tmp_path / "export", "direct")  # force_not_quantize, as Kandinsky decodes

    images = _photos(12, seed=11)
    latents, pictures = _library(model, images, quantize=False)
    _pytorch_runs_the_latent_graphs(tmp_path / "export", images, latents, pictures)
    _each_latent_graph_is_judged_on_its_own(tmp_path / "export", latents, images)


def _pytorch_runs_the_latent_graphs(
    export: Path, images: np.ndarray, latents: np.ndarray, pictures: np.ndarray
) -> None:
    """`--backend torch` runs the model's own latents and decode in FP32 (the library's code: the reference), and
    at BF16 the bodies under autocast, checked by parity like any other runtime's and started only as it allows."""
    import vqtool
    from vqtool.export.parity import check_export

    with vqtool.load(export, "torch", "cpu") as tok:
        assert np.abs(tok.encode_latents(images) - latents).max() <= 1e-5 * np.abs(latents).max()  # FP32 reordered
        assert psnr(pictures, tok.decode_latents(latents)) >= 50
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return  # PyTorch refuses BF16 on a CPU without its arithmetic
    verification = check_export(export, backends=("torch",), precisions=("bf16",), log=lambda _: None)
    (report,) = verification.latents
    assert (report.runtime, report.precision) == ("torch", "bf16")
    assert 0 < report.latent_error < 0.5 and report.decode_psnr < 100  # really rounded, and still the same model
    with vqtool.load(export, "torch", "cpu", precision="bf16", lazy=True) as tok:
        for role, call in (
            ("decoder_latents", lambda: tok.decode_latents(latents)),
            ("encoder_latents", lambda: tok.encode_latents(images)),
        ):
            if report.failures_of(role):
                with pytest.raises(vqtool.VqtoolError, match=f"torch bf16 {role} missed its rule"):
                    call()
            else:
                assert call().shape[0] == len(images)


def _each_latent_graph_is_judged_on_its_own(export: Path, latents: np.ndarray, images: np.ndarray) -> None:
    """A diffusion pipeline that decodes latents needs the decoder's rule met, not the encoder's: a record in which
    only FP16's encoder missed refuses encode_latents and still decodes; a record without the per-graph lists (written
    by hand or by an older vqtool) refuses both; and an export leaves out only the graph that missed."""
    import vqtool
    from vqtool.export.pipeline import _drop_refused_latents
    from vqtool.formats.manifest import read_manifest
    from vqtool.formats.records import LatentReport

    parity_path = export / "parity.json"
    record = json.loads(parity_path.read_text())
    (fp16,) = [r for r in record["latents"] if r["precision"] == "fp16"]
    assert fp16["passed"]  # the fault below is the only one
    with vqtool.load(export, "onnxruntime", "cpu", precision="fp16") as tok:
        tok.encode_latents(images[:2])  # both start before the record changes
    fp16.update(encoder_failures=["latents differ by 0.03 of their range (> 0.02)"], decoder_failures=[])
    parity_path.write_text(json.dumps(record))
    with vqtool.load(export, "onnxruntime", "cpu", precision="fp16") as tok:
        assert tok.decode_latents(latents[:2]).shape == (2, *images.shape[1:])
        with pytest.raises(vqtool.VqtoolError, match=r"encoder_latents missed its rule .*0\.03 of their range"):
            tok.encode_latents(images[:2])
    for key in ("encoder_failures", "decoder_failures"):
        del fp16[key]
    fp16.update(failures=["decoded 30.0 dB from PyTorch's decode (< 40)"], passed=False)
    parity_path.write_text(json.dumps(record))
    with vqtool.load(export, "onnxruntime", "cpu", precision="fp16") as tok:
        with pytest.raises(vqtool.VqtoolError, match="decoder_latents missed its rule"):
            tok.decode_latents(latents[:2])
        with pytest.raises(vqtool.VqtoolError, match="encoder_latents missed its rule"):
            tok.encode_latents(images[:2])
    # BF16 runs no graph of its own: its refusal lives in parity.json. Codes that met no contract refuse a lazy
    # tokenizer's codes graphs when they start, not its latent graphs, which have a record of their own; one made
    # by another OpenVINO (another provider) still refuses the graph that missed until parity checks this one.
    record["reports"].append({"runtime": "openvino", "precision": "bf16", "contract": "none", "failures": ["far"]})
    elsewhere = {"runtime": "openvino", "provider": "OpenVINO elsewhere", "precision": "bf16"}
    record["latents"].append({**elsewhere, "encoder_failures": ["latents differ"], "decoder_failures": []})
    parity_path.write_text(json.dumps(record))
    np.save(export.parent / "bf16-latents.npy", latents[:2])
    outcome = in_subprocess(f"""
import json, numpy as np, openvino, vqtool
said = {{"bf16_here": "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")}}
try:
    vqtool.load({str(export)!r}, "openvino", "cpu", precision="bf16")
except vqtool.VqtoolError as exc:
    said["load"] = str(exc)
pictures = np.zeros({(1, *images.shape[1:])}, np.uint8)
with vqtool.load({str(export)!r}, "openvino", "cpu", precision="bf16", lazy=True) as tok:
    for name, call in (
        ("decoded", lambda: list(tok.decode_latents(np.load({str(export.parent / "bf16-latents.npy")!r})).shape)),
        ("encode", lambda: tok.encode(pictures)),
        ("encode_latents", lambda: tok.encode_latents(pictures)),
    ):
        try:
            said[name] = call()
        except vqtool.VqtoolError as exc:
            said[name] = str(exc)
print(json.dumps(said))
""")
    assert isinstance(outcome, dict)
    if not outcome["bf16_here"]:  # OpenVINO runs no BF16 on this CPU: every graph says so, records or not
        for name in ("load", "decoded", "encode", "encode_latents"):
            assert "this CPU has no BF16 support in OpenVINO" in outcome[name], outcome
    else:
        _records_decide_each_graph(outcome)
    missed = LatentReport("onnxruntime", precision="fp16", decoder_failures=("decoded 30.0 dB (< 40)",))
    kept = _drop_refused_latents(export, read_manifest(export), (missed,), log=lambda _: None)
    assert "encoder_latents.fp16" in kept.graphs and "decoder_latents.fp16" not in kept.graphs
    assert (export / "encoder_latents.fp16.onnx").exists() and not (export / "decoder_latents.fp16.onnx").exists()
    assert read_manifest(export).graphs == kept.graphs
    assert "encoder_latents" in kept.graphs and "decoder_latents" in kept.graphs  # FP32's are never left out


def _records_decide_each_graph(outcome: dict[str, Any]) -> None:
    """Where OpenVINO runs BF16: the latent decode its record let through, and the refusals of the rest."""
    assert outcome["decoded"] == [2, SIZE, SIZE, 3], outcome
    assert "openvino bf16 met no contract on this export (far)" in outcome["load"]
    assert "openvino bf16 met no contract on this export (far)" in outcome["encode"]
    refused = outcome["encode_latents"]
    assert "bf16 encoder_latents missed its rule on this export on openvino (OpenVINO elsewhere)" in refused
    assert "openvino was never checked" in refused


def test_latent_options_and_refusals_on_the_command_line(
    tmp_path: Path, trained_checkpoint: Path, export_dir: Path
) -> None:
    """vqtool's own models have latent graphs too: the reference design (the suite's trained checkpoint, whose
    latents its pipeline would quantise) exported with `--latent-decode direct`, which implies `--latents`."""
    export = tmp_path / "export"
    exported = run_cli("export", str(trained_checkpoint), "--out", str(export), "--latent-decode", "direct")
    assert exported.returncode == 0, exported.stderr
    assert "encoder_latents.onnx" in exported.stdout and "decoder_latents.onnx" in exported.stdout
    assert "latent graphs: encoder_latents meets its rule, decoder_latents meets its rule" in exported.stderr
    assert json.loads((export / "manifest.json").read_text())["latent_decode"] == "direct"
    # vqtool parity measures the latent graphs again, and keeps their record.
    checked = run_cli("parity", str(export), "--backend", "onnxruntime")
    assert checked.returncode == 0, checked.stderr
    (latents,) = json.loads((export / "parity.json").read_text())["latents"]
    assert latents["passed"] and latents["decode"] == "direct"

    import vqtool
    from vqtool.model.checkpoint import load_checkpoint

    images = _photos(6, seed=2)
    model = load_checkpoint(trained_checkpoint).model
    with torch.no_grad():
        theirs = model.pipeline_latents(model.model_input(torch.from_numpy(images))).numpy()
    with vqtool.load(export, "onnxruntime", "cpu") as tok:
        ours = tok.encode_latents(images)
        assert ours.shape == theirs.shape == (6, 256, 2, 2)  # the reference design: D = 256, a 2 x 2 grid
        assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()
        with pytest.raises(vqtool.VqtoolError, match="latents must be finite floats"):
            tok.decode_latents(np.full((1, 256, 2, 2), np.nan, np.float32))
        with pytest.raises(vqtool.VqtoolError, match=r"this model's latents are N x 256 x 2 x 2, got float32 shaped"):
            tok.decode_latents(np.zeros((1, 3, 2, 2), np.float32))
    with vqtool.load(export_dir, "torch", "cpu", lazy=True) as tok:  # PyTorch too: only where exported with them
        with pytest.raises(vqtool.VqtoolError, match="no latent graphs; export again with --latents"):
            tok.encode_latents(images[:2])
    with vqtool.load(export_dir, "onnxruntime", "cpu") as tok:  # an export without --latents
        assert not tok.has_latents
        with pytest.raises(vqtool.VqtoolError, match="export again with --latents"):
            tok.decode_latents(np.zeros((1, 256, 2, 2), np.float32))
    refused = run_cli("export", str(trained_checkpoint), "--out", str(tmp_path / "x"), "--latent-decode", "sideways")
    assert refused.returncode != 0 and "sideways" in refused.stderr
    assert not (tmp_path / "x").exists()

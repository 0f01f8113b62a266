"""OpenVINO: the same graphs at FP32, BF16 (quantizer kept FP32) and INT8, held to parity, chosen by measurement."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, in_subprocess, one_error_line, run_cli
from vqtool.host import cpu_description
from vqtool.precisions import BOUNDED, TABLE

# Checked without importing OpenVINO: it stays out of the test process (see in_subprocess).
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None, reason="OpenVINO is not installed (pip install 'vqtool[openvino]')"
)


def _bf16_here() -> bool:
    """OpenVINO's CPU plugin offers BF16 where the CPU has AVX-512 BF16 or AMX."""
    flags = Path("/proc/cpuinfo").read_text().split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


needs_bf16 = pytest.mark.skipif(not _bf16_here(), reason="this CPU has no BF16 in OpenVINO (AVX-512 BF16 or AMX)")


@pytest.fixture()
def export_copy(export_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "export"
    shutil.copytree(export_dir, copy)
    return copy


@pytest.fixture()
def int8_copy(int8_export: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "int8-export"
    shutil.copytree(int8_export, copy)
    return copy


def test_parity_publishes_each_openvino_precision_under_the_contract_it_meets(int8_copy: Path) -> None:
    result = run_cli("parity", str(int8_copy), "--backend", "openvino", "--naive-bf16")
    saved = json.loads((int8_copy / "parity.json").read_text())
    checked = [r for r in saved["reports"] if r["runtime"] == "openvino"]
    reports = {r["precision"]: r for r in checked}
    # Export's own reports (ONNX Runtime) are kept beside the ones this run added.
    assert {r["runtime"] for r in saved["reports"]} == {"onnxruntime", "openvino"}
    assert reports["fp32"]["contract"] == "exact" and reports["fp32"]["unexplained"] == 0
    assert {r["cpu"] for r in checked} == {cpu_description()}  # each drift names the CPU family it was measured on
    assert reports["fp32"]["recon_max_abs"] <= 1

    def bounded_misses(report: dict[str, object]) -> list[str]:
        drift = report["drift_psnr"]
        return BOUNDED.missed(
            float(report["identical_fraction"]),  # type: ignore[arg-type]
            float(report["regret_p99"]),  # type: ignore[arg-type]
            int(report["rank_max"]),  # type: ignore[call-overload]
            float("inf") if drift is None else float(drift),  # type: ignore[arg-type]
        )

    # INT8 has the bounded contract only, judged by its drift.
    int8 = reports["int8"]
    assert int8["contract"] == ("none" if bounded_misses(int8) else "bounded")
    if _bf16_here():
        bf16, naive = reports["bf16"], saved["naive_bf16_for_comparison"]
        rule = TABLE["bf16"].rule
        assert rule == TABLE["fp16"].rule  # BF16's exact contract is FP16's rule
        exact = bf16["identical_fraction"] >= rule.min_identical and bf16["unexplained"] == 0
        exact = exact and bf16["batch_unexplained"] == 0 and bf16["recon_psnr"] >= rule.min_psnr
        expected = "exact" if exact else ("none" if bounded_misses(bf16) else "bounded")
        assert bf16["contract"] == expected
        assert naive["precision"] == "bf16-naive"
    else:  # the comparison asked for cannot run here: said, and the rest measured and kept
        assert saved["naive_bf16_for_comparison"] is None and "bf16" not in reports
        assert "not checked: openvino on cpu (bf16-naive): this CPU has no BF16 support in OpenVINO" in result.stderr
    # The command's verdict is every report's: each met a contract.
    every = all(r["contract"] != "none" for r in checked)
    assert result.returncode == (0 if every else 1), result.stderr
    if not every:  # the reason given is the bounded contract's miss, not the exact rule's that made it try that
        assert "has no exact contract)" not in one_error_line(result, "parity failed for openvino")


@needs_bf16
def test_the_bf16_island_keeps_the_quantizer_in_fp32(export_dir: Path) -> None:
    found = in_subprocess(f"""
import json
from pathlib import Path
from vqtool.runtime.openvino import OpenVinoRunner
found = {{}}
for role, island in (("encoder", False), ("encoder", True), ("decoder", True)):
    runner = OpenVinoRunner(Path({str(export_dir)!r}) / f"{{role}}.onnx", role, "bf16", island=island)
    layers = found.setdefault(f"{{role}} {{island}}", {{}})
    for layer in runner.runtime_precisions():
        layers.setdefault(layer["type"], []).append(layer["precision"])
print(json.dumps(found))
""")
    assert isinstance(found, dict)
    # Without the island OpenVINO runs the distance product in BF16 (the fault the island exists for)...
    whole = found["encoder False"]
    assert "bf16" in whole["FullyConnected"] and "bf16" in whole["Convolution"]
    # ...with it, the convolutions stay BF16 and the distances and ArgMin (TopK) are FP32.
    split = found["encoder True"]
    assert set(split["FullyConnected"]) == {"f32"} and set(split["TopK"]) == {"f32"} and "bf16" in split["Convolution"]
    # On the decoder the codebook lookup stays FP32 and the convolutions run BF16.
    decoder = found["decoder True"]
    assert "bf16" not in decoder["Gather"] and "bf16" in decoder["Convolution"]


def test_encode_and_decode_with_openvino(export_dir: Path, mixed_folder: Path, tmp_path: Path) -> None:
    ort = run_cli("encode", str(mixed_folder), "--model", str(export_dir), "--out", str(tmp_path / "ort.npy"))
    ov = run_cli(
        "encode",
        str(mixed_folder),
        "--model",
        str(export_dir),
        "--out",
        str(tmp_path / "ov.npy"),
        "--backend",
        "openvino",
    )
    assert ort.returncode == 0 and ov.returncode == 0, ov.stderr
    assert "OpenVINO" in ov.stderr and "fp32" in ov.stderr
    sidecar = json.loads((tmp_path / "ov.json").read_text())
    assert (sidecar["backend"], sidecar["precision"]) == ("openvino", "fp32")
    assert json.loads((tmp_path / "ort.json").read_text())["backend"] == "onnxruntime"
    # FP32 in both runtimes: the same codes, but for a near-tie that rounding may settle either way on some CPU.
    assert (np.load(tmp_path / "ov.npy") == np.load(tmp_path / "ort.npy")).sum() >= 31
    decoded = run_cli(
        "decode",
        str(tmp_path / "ov.npy"),
        "--model",
        str(export_dir),
        "--out",
        str(tmp_path / "r"),
        "--backend",
        "openvino",
    )
    assert decoded.returncode == 0, decoded.stderr
    assert len(list((tmp_path / "r").glob("*.png"))) == 8


def test_the_api_runs_openvino_from_several_threads(int8_export: Path) -> None:
    outcome = in_subprocess(f"""
import json, threading
import numpy as np
import vqtool
tok = vqtool.load({str(int8_export)!r}, backend="openvino", precision="int8")
rng = np.random.default_rng(0)
batches = [rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8) for _ in range(6)]
expected = [tok.encode(b) for b in batches]
results = {{}}
def work(index):
    for _ in range(4):
        results[index] = tok.encode(batches[index])
threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
same = all(np.array_equal(results[i], codes) for i, codes in enumerate(expected))
print(json.dumps([tok.backend, tok.describe(), same]))
""")
    backend, described, same = outcome  # type: ignore[misc]
    assert backend == "openvino" and "int8" in described and same


def _bf16_report(passed: bool) -> dict[str, object]:
    failures = [] if passed else ["98.88% identical codes, below 99.5%"]
    return {
        "runtime": "openvino",
        "precision": "bf16",
        "passed": passed,
        "failures": failures,
        "identical_fraction": 0.9988,
    }


@needs_bf16
def test_bf16_runs_only_where_parity_did_not_record_a_failure(export_copy: Path, mixed_folder: Path) -> None:
    def encode() -> object:
        return run_cli(
            "encode", str(mixed_folder), "--model", str(export_copy), "--out", str(export_copy / "c.npy"),
            "--backend", "openvino", "--precision", "bf16", "--overwrite",
        )  # fmt: skip

    saved = json.loads((export_copy / "parity.json").read_text())
    unchecked = encode()
    assert unchecked.returncode == 0 and "bf16 not yet checked" in unchecked.stderr
    assert json.loads((export_copy / "c.json").read_text())["precision"] == "bf16"
    (export_copy / "parity.json").write_text(json.dumps({**saved, "reports": [_bf16_report(False)]}))
    refused = encode()
    one_error_line(refused, "bf16 met no contract on this export", "98.88% identical codes")
    assert "use fp32" in refused.stderr and "int8" not in refused.stderr  # no INT8 graph passed here
    int8 = {**_bf16_report(True), "runtime": "onnxruntime", "precision": "int8"}
    (export_copy / "parity.json").write_text(json.dumps({**saved, "reports": [_bf16_report(False), int8]}))
    assert "use fp32 or int8" in encode().stderr
    (export_copy / "parity.json").write_text(json.dumps({**saved, "reports": [_bf16_report(True)]}))
    assert "bf16 exact contract: 99.88% identical codes" in encode().stderr
    # BF16 is OpenVINO's and PyTorch's, not ONNX Runtime's.
    refused = run_cli(
        "encode", str(mixed_folder), "--model", str(export_copy), "--out", str(export_copy / "d.npy"),
        "--backend", "onnxruntime", "--precision", "bf16",
    )  # fmt: skip
    one_error_line(refused, "--backend onnxruntime runs fp32, fp16 or int8")


def test_auto_takes_the_fastest_runtime_with_exact_codes(export_copy: Path) -> None:
    def bench_rows(ov_speed: float) -> dict[str, object]:
        rows = [
            {"stage": "encode", "backend": name, "precision": "fp32", "batch": 256, "images_per_s": speed}
            for name, speed in (("torch", 9000.0), ("onnxruntime", 10000.0), ("openvino", ov_speed))
        ]
        return {"model_only": rows}

    saved = json.loads((export_copy / "parity.json").read_text())
    exact = {"runtime": "openvino", "precision": "fp32", "passed": True, "identical": 1792, "codes": 1792}
    (export_copy / "bench.json").write_text(json.dumps(bench_rows(20000.0)))
    others = [r for r in saved["reports"] if r["runtime"] != "openvino"]
    (export_copy / "parity.json").write_text(json.dumps({**saved, "reports": [*others, exact]}))

    def chosen() -> tuple[str, str]:
        code = f"import json, vqtool; t = vqtool.load({str(export_copy)!r}, device='cpu')\n"
        code += "print(json.dumps([t._encoder.runner.backend, t.describe()]))"
        backend, described = in_subprocess(code)  # type: ignore[misc]
        return backend, described

    backend, described = chosen()
    assert backend == "openvino" and "openvino 20,000 against onnxruntime 10,000 images/s" in described
    # Slower, or not shown exact by parity: ONNX Runtime.
    (export_copy / "bench.json").write_text(json.dumps(bench_rows(5000.0)))
    assert chosen()[0] == "onnxruntime"
    (export_copy / "bench.json").write_text(json.dumps(bench_rows(20000.0)))
    (export_copy / "parity.json").write_text(json.dumps({**saved, "reports": [{**exact, "identical": 1791}]}))
    backend, described = chosen()
    assert backend == "onnxruntime" and "parity.json shows no exact fp32 codes from OpenVINO" in described
    # Both exact, but never timed against each other (the reason alone, read where auto reads it, in this process).
    from vqtool.runtime.select import cpu_choice

    (export_copy / "parity.json").write_text(json.dumps({**saved, "reports": [*others, exact]}))
    (export_copy / "bench.json").write_text(json.dumps({"model_only": []}))
    order, why = cpu_choice(export_copy, "encoder", "fp32")
    assert order[0] == "onnxruntime" and "bench.json has not timed ONNX Runtime against OpenVINO at fp32 here" in why


def test_bench_says_which_runtime_is_fastest_and_on_what_cpu(int8_copy: Path) -> None:
    result = run_cli(
        "bench", str(int8_copy), "--batch", "8", "--seconds", "0.3", "--backend", "openvino", "--backend", "torch"
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((int8_copy / "bench.json").read_text())
    assert report["cpu"] in result.stderr and "fastest here, at batch 8" in result.stderr
    fastest = {(f["stage"], f["precision"]): f["backend"] for f in report["fastest"]}
    assert fastest[("encode", "int8")] in ("onnxruntime", "openvino")
    for entry in report["fastest"]:  # each with the contract its codes are published under, or how to check it
        if entry["contract"] == "unchecked":
            check = f"vqtool parity {int8_copy} --backend {entry['backend']} --precision {entry['precision']}"
            assert check in result.stderr
        else:
            assert entry["contract"] in ("exact", "bounded")
    assert {r["backend"] for r in report["model_only"]} == {"torch", "openvino"}  # as limited, with the baseline
    # PyTorch under BF16 autocast is timed against eager FP32, beside the other runtimes.
    if _bf16_here():
        autocast = [r for r in report["model_only"] if (r["backend"], r["precision"]) == ("torch", "bf16")]
        assert autocast and all(r["vs_baseline"] > 0 for r in autocast)


def test_without_openvino_the_backend_names_the_extra(export_dir: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "blocker" / "openvino"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'openvino'\", name='openvino')\n")
    result = run_cli(
        "encode", str(tmp_path), "--model", str(export_dir), "--out", str(tmp_path / "c.npy"), "--backend", "openvino",
        env={"PYTHONPATH": f"{blocker.parent}:{REPO}"},
    )  # fmt: skip
    one_error_line(result, "needs OpenVINO, which is not installed: pip install 'vqtool[openvino]'")


def test_export_publishes_bf16_under_the_contract_it_meets(int8_export: Path, tmp_path: Path) -> None:
    checkpoint = int8_export.parent / "run" / "checkpoint.pt"
    result = run_cli("export", str(checkpoint), "--out", str(tmp_path / "export"), "--bf16")
    if not _bf16_here():  # refused before any work, naming each runtime that cannot run BF16 here
        line = one_error_line(result, "openvino on cpu (bf16): this CPU has no BF16 support in OpenVINO")
        assert line.startswith("error: --bf16: ") and not (tmp_path / "export").exists()
        assert "parity" not in result.stdout and "graph" not in result.stdout, result.stdout
        return
    assert result.returncode == 0, result.stderr  # a BF16 that meets no contract is refused, the rest published
    folder = tmp_path / "export"
    reports = {(r["runtime"], r["precision"]): r for r in json.loads((folder / "parity.json").read_text())["reports"]}
    for runtime in ("openvino", "torch"):  # OpenVINO's BF16 hint and PyTorch's autocast, each judged
        bf16 = reports[(runtime, "bf16")]
        assert bf16["contract"] in ("exact", "bounded", "none") and bf16["batch_sizes"]
        assert (f"refused: {runtime} bf16" in result.stdout) == (bf16["contract"] == "none"), result.stdout
    drift = result.stdout[result.stdout.index("batch-invariant") :]  # the drift table, after the parity one
    assert "openvino (CPU)" in drift and "│ bf16" in drift

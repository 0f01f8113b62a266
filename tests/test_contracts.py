"""The two contracts: exact and bounded. Drift measured against the exact codes, the contract chosen by the rule in the
precision table, recorded in every output, and never mixed by merge or --resume."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import vqtool
from tests.conftest import in_subprocess, one_error_line, run_cli
from vqtool.export.drift import measure_drift, regret_and_rank
from vqtool.export.parity import Reference, check_parity, torch_reference
from vqtool.host import cpu_description
from vqtool.model.checkpoint import load_checkpoint
from vqtool.precisions import BOUNDED


def test_regret_and_rank_read_the_latent_space() -> None:
    """Codes 0, 1, 3 on a line; latents at 0.1 and 2.9 (exact codes 0 and 2). Mean quantisation error: (0.01 +
    0.01) / 2 = 0.01. The first latent given code 1: regret (0.81 - 0.01) / 0.01 = 80, rank 1; the second given
    code 0: (8.41 - 0.01) / 0.01 = 840, rank 2 (code 1 lies between)."""
    book = torch.tensor([[0.0], [1.0], [3.0]])
    latents = torch.tensor([[[[0.1]], [[2.9]]]])  # 1 image, a 2 x 1 grid
    reference = Reference(latents, np.array([[[0], [2]]]), None)
    regret, rank = regret_and_rank(reference, book, np.array([[[1], [0]]]))
    assert regret == pytest.approx([80.0, 840.0], rel=1e-5) and list(rank) == [1, 2]  # float32 latents
    none_changed = regret_and_rank(reference, book, np.array([[[0], [2]]]))
    assert len(none_changed[0]) == 0
    # A rank's percentiles are whole places (nearest rank), not points between two of them.
    drift = measure_drift(reference, book, np.array([[[1], [0]]]), None, None)
    assert (drift.rank_p50, drift.rank_p99, drift.rank_max) == (1, 2, 2)


@pytest.fixture(scope="module")
def png_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 real 32 x 32 crops of the embedded photographs, as PNG files."""
    from PIL import Image

    from vqtool.train.data.memory import default_training_set

    folder = tmp_path_factory.mktemp("crops")
    for index, crop in enumerate(default_training_set(32).batch(0, 24, seed=5)):
        Image.fromarray(crop).save(folder / f"{index:03d}.png")
    return folder


@pytest.fixture(scope="module")
def int8_model(int8_export: Path):  # noqa: ANN201
    return load_checkpoint(int8_export / "model.pt").model


def _moved(reference: Reference, codebook: torch.Tensor, share: float, rank: int) -> np.ndarray:
    """The exact codes with `share` of them moved to their latent's `rank`-th nearest code: those of the latents
    nearest to a tie between their two nearest codes, as rounding moves them."""
    distances = torch.cdist(reference.latents.to(torch.float64).flatten(0, 2), codebook.to(torch.float64)) ** 2
    nearest, order = distances.sort(1)
    codes = reference.codes.reshape(-1).copy()
    moved = (nearest[:, 1] - nearest[:, 0]).argsort()[: max(1, round(share * len(codes)))].numpy()
    codes[moved] = order[moved, rank].numpy()
    return codes.reshape(reference.codes.shape)


def _judged(model, images: np.ndarray, reference: Reference, codes: np.ndarray, **keywords):  # noqa: ANN001, ANN202
    """Parity of an encoder that gives `codes` (and decodes with PyTorch), as the runtime of `precision`."""
    decode = lambda c: model.model_output(model.decode(torch.from_numpy(c.astype(np.int64)))).numpy()  # noqa: E731
    given = {"rows": 0}

    def encode(batch: np.ndarray) -> np.ndarray:
        start = given["rows"] % len(images)
        given["rows"] += len(batch)
        return codes[start : start + len(batch)]

    with torch.no_grad():
        return check_parity(
            model, images, encode, decode, runtime="test", provider="test", reference=reference, batch=len(images),
            **keywords,
        )  # fmt: skip


def test_the_contract_is_the_best_the_codes_meet(int8_model, int8_export: Path) -> None:  # noqa: ANN001
    from vqtool.train.data.run_data import held_out_images

    images = held_out_images(load_checkpoint(int8_export / "model.pt"), log=lambda _: None)[:64]
    with torch.no_grad():
        reference = torch_reference(int8_model, images)
    codebook = int8_model.quantizer.search_codebook().detach()
    exact = _judged(int8_model, images, reference, reference.codes, precision="int8")
    assert exact.contract == "bounded" and exact.identical_fraction == 1.0  # INT8 has no exact contract
    fp16 = _judged(int8_model, images, reference, reference.codes, precision="fp16")
    assert fp16.contract == "exact" and fp16.batch_identical == 1.0
    # 1 code in 50 moved to its second-nearest: a near neighbour, decoded within the limit.
    near = _judged(int8_model, images, reference, _moved(reference, codebook, 0.02, 1), precision="fp16")
    assert near.rank_max == 1 and near.regret_p99 <= BOUNDED.max_regret_p99, near
    assert near.drift_psnr >= BOUNDED.min_drift_psnr and near.contract == "bounded", near
    assert "below 99.5%" in near.outside_exact[0]  # FP16's exact rule misses it...
    demanding = _judged(
        int8_model, images, reference, _moved(reference, codebook, 0.02, 1), precision="fp16", min_identical=0.99
    )
    assert demanding.contract == "none" and "below the 99.0% asked for" in demanding.failures[-1]
    # The same share moved to far codes: no contract.
    far = _judged(int8_model, images, reference, _moved(reference, codebook, 0.02, 40), precision="fp16")
    assert far.rank_max == 40 and far.contract == "none" and not far.passed
    assert any("ranks 40" in failure for failure in far.failures)
    # Nothing but FP32's rule at FP32: a moved code is no contract at all.
    fp32 = _judged(int8_model, images, reference, _moved(reference, codebook, 0.02, 1), precision="fp32")
    assert fp32.contract == "none"


def test_batch_invariance_is_measured_and_exact_needs_it(int8_model, int8_export: Path) -> None:  # noqa: ANN001
    from vqtool.train.data.run_data import held_out_images

    images = held_out_images(load_checkpoint(int8_export / "model.pt"), log=lambda _: None)[:32]
    with torch.no_grad():
        reference = torch_reference(int8_model, images)
    codebook = int8_model.quantizer.search_codebook().detach()
    far = _moved(reference, codebook, 1.0, 5)
    decode = lambda c: int8_model.model_output(int8_model.decode(torch.from_numpy(c.astype(np.int64)))).numpy()  # noqa: E731

    def batch_dependent(batch: np.ndarray) -> np.ndarray:
        """The exact codes for the whole set at once; alone, or in small batches, the first image's are far codes."""
        index = [int(np.flatnonzero((images == one).all((1, 2, 3)))[0]) for one in batch]
        codes = reference.codes[index].copy()
        if len(batch) < len(images):
            codes[0] = far[index[0]]
        return codes

    with torch.no_grad():
        report = check_parity(
            int8_model, images, batch_dependent, decode, runtime="test", provider="test", precision="fp32",
            reference=reference, batch=len(images),
        )  # fmt: skip
    assert report.identical_fraction == 1.0 and report.batch_sizes == (1, 4, 16)
    assert report.batch_identical < 1.0 and report.batch_unexplained > 0
    assert report.contract == "none" and "change with the batch size" in report.failures[0]


def test_every_output_says_what_made_it(int8_export: Path, png_folder: Path, tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    tok = vqtool.load(int8_export, precision="int8")
    contract = tok.contract
    assert (contract.name, contract.backend, contract.precision) == ("bounded", "onnxruntime", "int8")
    assert contract.identical_fraction is not None and contract.identical_fraction < 1.0
    assert "codes under the bounded contract (" in tok.describe()
    result = run_cli("encode", str(png_folder), "--model", str(int8_export), "--out", str(tmp_path / "c.parquet"),
                     "--precision", "int8")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "under the bounded contract" in result.stdout
    recorded = json.loads(pq.read_schema(tmp_path / "c.parquet").metadata[b"vqtool.codes"])
    assert recorded["contract"]["name"] == "bounded" and recorded["contract"]["backend"] == "onnxruntime"
    assert recorded["manifest_sha256"] and recorded["contract"]["regret_p99"] == contract.regret_p99
    exact = vqtool.load(int8_export).contract
    assert exact.name == "exact" and exact.key == "exact"


def test_merge_refuses_shards_of_two_contracts(int8_export: Path, png_folder: Path, tmp_path: Path) -> None:
    pytest.importorskip("openvino")

    def shard(index: int, backend: str) -> Path:
        out = tmp_path / f"{backend}{index}.npy"
        result = run_cli(
            "encode", str(png_folder), "--model", str(int8_export), "--out", str(out), "--shard", f"{index}/2",
            "--precision", "int8", "--backend", backend,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return out

    ours = [shard(0, "onnxruntime"), shard(1, "onnxruntime")]
    merged = run_cli("merge", *map(str, ours), "--out", str(tmp_path / "m.npy"))
    assert merged.returncode == 0, merged.stderr  # the same contract: joined, and recorded
    assert json.loads((tmp_path / "m.json").read_text())["contract"]["name"] == "bounded"
    # OpenVINO's INT8 was not checked by export's parity: its codes are under no promise, never joined to others.
    mixed = run_cli("merge", str(ours[0]), str(shard(1, "openvino")), "--out", str(tmp_path / "x.npy"))
    one_error_line(mixed, "under the unchecked (openvino int8) contract")
    assert "under the bounded (onnxruntime int8) one" in mixed.stderr and not (tmp_path / "x.npy").exists()


def test_resume_refuses_to_continue_under_another_contract(int8_export: Path, png_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "codes.npy"

    def interrupted(contract: str) -> None:
        signature = {"list_sha256": "0" * 64, "rows": 24, "done": 8, "contract": contract}
        np.lib.format.open_memmap(tmp_path / ".codes.npy.partial", mode="w+", dtype=np.uint8, shape=(24, 8, 8))
        (tmp_path / ".codes.npy.progress.json").write_text(json.dumps(signature))

    def resume(*runtime: str) -> subprocess.CompletedProcess[str]:
        return run_cli("encode", str(png_folder), "--model", str(int8_export), "--out", str(out), "--resume", *runtime)

    interrupted("bounded (openvino int8)")
    refused = resume("--precision", "int8", "--backend", "onnxruntime")
    one_error_line(refused, "the interrupted run's codes were made under the bounded (openvino int8) contract")
    assert "this run's would be under the bounded (onnxruntime int8) one" in refused.stderr
    interrupted("exact")
    refused = resume("--precision", "int8", "--backend", "onnxruntime")
    one_error_line(refused, "made under the exact contract and this run's would be under the bounded (onnxruntime")
    # The same contract passes that check (and stops at the next: this record names other files).
    interrupted("bounded (onnxruntime int8)")
    one_error_line(resume("--precision", "int8", "--backend", "onnxruntime"), "other files or used another model")
    assert not out.exists()


def test_fastest_starts_the_fastest_runtime_published_under_a_contract(
    int8_export: Path, png_folder: Path, tmp_path: Path
) -> None:
    import shutil

    export = tmp_path / "export"
    shutil.copytree(int8_export, export)
    # Nothing measured: FP32, and the reason says how to measure.
    unmeasured = vqtool.load(export, precision="fastest")
    assert unmeasured.precision == "fp32" and "bench.json has measured none of the runtimes" in unmeasured.describe()

    def measured(speeds: dict[tuple[str, str], float]) -> None:
        rows = [
            {"stage": "encode", "backend": b, "precision": p, "batch": 64, "images_per_s": v, "provider": ""}
            for (b, p), v in speeds.items()
        ]
        (export / "bench.json").write_text(json.dumps({"model_only": rows}))

    measured({("onnxruntime", "fp32"): 1000.0, ("onnxruntime", "int8"): 3000.0, ("onnxruntime", "fp16"): 500.0})
    fastest = vqtool.load(export, precision="fastest")
    assert (fastest.backend, fastest.precision, fastest.contract.name) == ("onnxruntime", "int8", "bounded")
    assert "fastest: onnxruntime int8, 3,000 images/s at batch 64" in fastest.describe()
    # A faster runtime parity never published is passed over.
    measured({("onnxruntime", "fp32"): 1000.0, ("onnxruntime", "int8"): 3000.0, ("openvino", "bf16"): 9000.0})
    assert vqtool.load(export, precision="fastest").precision == "int8"
    # The command line takes it too, and the codes say what made them.
    result = run_cli("encode", str(png_folder), "--model", str(export), "--out", str(tmp_path / "c.npy"),
                     "--precision", "fastest")  # fmt: skip
    assert result.returncode == 0, result.stderr
    sidecar = json.loads((tmp_path / "c.json").read_text())
    assert sidecar["precision"] == "int8" and sidecar["contract"]["name"] == "bounded"
    assert sidecar["contract"]["parity_cpu"] == cpu_description()  # the drift's figures name the CPU they hold on


def test_a_record_never_claims_more_than_it_can_hold() -> None:
    """parity.json is read as written, by hand or by an older vqtool: a contract its precision cannot meet, a
    contract beside failures, or a name no contract has, does not start a runtime under a better one."""
    from vqtool.formats.records import ParityReport

    def met(**fields: object) -> str:
        return ParityReport.from_dict({"runtime": "onnxruntime", "precision": "fp32", **fields}).met

    assert met(contract="exact") == "exact" and met(contract="bounded") == "bounded"
    assert met(passed=True) == "exact" and met(precision="int8", passed=True) == "bounded"  # older than contracts
    assert met(precision="int8", contract="exact") == "bounded"  # INT8's rule is end to end: bounded at best
    assert ParityReport(runtime="onnxruntime", precision="int8", contract="exact").met == "bounded"  # built, not read
    assert met(contract="exact", failures=["17 codes differ"]) == "none"
    assert met(contract="exact", passed=False) == "none"
    assert met(contract="sideways") == "none"


def test_a_record_is_held_to_todays_rules_by_its_own_figures() -> None:
    """A record claims what its figures meet under the precision table's rules, and no more: one whose figures miss
    them (written by hand, or by a vqtool whose rules were looser) reads as the contract they do meet, with why."""
    from vqtool.formats.records import LatentReport, ParityReport
    from vqtool.precisions import BOUNDED

    def read(**fields: object) -> ParityReport:
        return ParityReport.from_dict({"runtime": "openvino", "codes": 1000, "identical": 1000, **fields})

    near = dict(regret_p99=0.5, rank_max=2, drift_psnr=45.0)
    assert read(precision="bf16", contract="exact", identical=999, **near).met == "exact"  # 99.9%: HALF's rule holds
    demoted = read(precision="bf16", contract="exact", identical=980, **near)  # 98%: below HALF's 99.5%
    assert demoted.met == "bounded" and "98.00% identical codes" in demoted.outside_exact[0]
    far = read(precision="int8", contract="bounded", identical=900, **{**near, "regret_p99": 9.0})
    assert far.met == "none" and not far.passed
    assert f"bounded: changed codes' regret p99 9 > {BOUNDED.max_regret_p99:g}" in far.failures
    assert far.first_failure.startswith("bounded: changed codes' regret p99 9")  # INT8 has no exact rule to miss
    both = read(precision="bf16", contract="exact", identical=980, **{**near, "regret_p99": 9.0})
    assert "98.00% identical codes" in both.failures[0]  # the exact rule's miss, then the bounded contract's
    assert both.met == "none" and both.first_failure.startswith("bounded: changed codes' regret p99 9")
    assert read(precision="int8", contract="bounded", identical=900, **{**near, "rank_max": 40}).met == "none"
    assert read(precision="int8", contract="bounded", identical=900, **{**near, "drift_psnr": 31.0}).met == "none"
    assert read(precision="int8", contract="bounded", identical=900, **near).met == "bounded"
    assert read(precision="int8", contract="bounded", identical=900, **{**near, "regret_p99": math.nan}).met == "none"
    unexplained = read(precision="fp32", contract="exact", identical=997, unexplained=3)
    assert unexplained.met == "none" and "3 codes differ from PyTorch" in unexplained.failures[0]
    assert unexplained.first_failure == unexplained.failures[0]  # FP32 has no bounded contract to try
    assert read(precision="fp32", contract="exact", identical=997, near_ties=3).met == "exact"  # near-ties count
    # Figures it does not have are not held against it; figures that are not numbers are.
    assert ParityReport.from_dict({"runtime": "openvino", "precision": "bf16", "passed": True}).met == "exact"
    assert read(precision="int8", contract="bounded", identical=900, **{**near, "rank_max": None}).met == "none"
    text = read(precision="fp32", contract="exact", identical="1000")
    assert text.met == "none" and text.failures == ("its figures are not all numbers",)
    share = ParityReport.from_dict({"runtime": "openvino", "precision": "bf16", "identical_fraction": "0.99"})
    assert share.met == "none" and share.failures == ("its figures are not all numbers",)  # no count: the share
    # A record claiming less than its figures meet keeps its claim (it may have asked for more: --min-identical).
    assert read(precision="int8", contract="none", failures=["bounded: 90.00% identical"], **near).met == "none"
    # The latent graphs are held to their rule the same way, each on its own.
    latent = LatentReport.from_dict(
        {"runtime": "openvino", "precision": "bf16", "latent_error": 0.01, "decode_psnr": 31.0, "passed": True}
    )
    assert not latent.failures_of("encoder_latents") and "31.0 dB" in latent.failures_of("decoder_latents")[0]
    unmeasured = LatentReport.from_dict({"runtime": "openvino", "precision": "bf16", "latent_error": math.nan})
    assert unmeasured.failures_of("encoder_latents") and not unmeasured.failures_of("decoder_latents")


def test_records_from_elsewhere_never_stop_a_run_with_a_traceback(tmp_path: Path) -> None:
    """parity.json and bench.json travel with exports from others: figures written as text, nesting deeper than the
    parser goes and rows of the wrong types are read as what they can claim (nothing), never as a crash."""
    from vqtool.formats.contract import contract_of
    from vqtool.formats.records import read_bench_rows, read_parity_reports

    parity = tmp_path / "parity.json"
    parity.write_text(json.dumps({"reports": [{"runtime": "onnxruntime", "precision": "fp32", "drift_psnr": "x"}]}))
    assert contract_of(tmp_path, "onnxruntime", "fp32", "").name == "none"
    (failed,) = read_parity_reports(tmp_path)
    assert failed.failures == ("its figures are not all numbers",) and failed.drift_psnr == math.inf
    parity.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(RecursionError):
        json.loads(parity.read_text())  # the nesting does go deeper than the parser
    assert read_parity_reports(tmp_path) == [] and contract_of(tmp_path, "onnxruntime", "fp32", "").name == "unchecked"
    rows = [{"stage": "encode", "backend": "onnxruntime", "batch": "64"}, {"stage": "encode", "backend": "openvino"}]
    (tmp_path / "bench.json").write_text(json.dumps({"model_only": [*rows, {**rows[1], "batch": 64}]}))
    assert [(r.backend, r.batch) for r in read_bench_rows(tmp_path)] == [("openvino", 0), ("openvino", 64)]


def test_a_refused_graph_starts_nowhere_until_checked_there(int8_export: Path, tmp_path: Path) -> None:
    """Export publishes a reduced precision that met no contract beside the rest: no runtime starts it, one never
    checked included, until `vqtool parity` records a contract there."""
    import shutil

    from vqtool.errors import VqtoolError

    export = tmp_path / "export"
    shutil.copytree(int8_export, export)
    record = json.loads((export / "parity.json").read_text())
    int8 = next(r for r in record["reports"] if (r["runtime"], r["precision"]) == ("onnxruntime", "int8"))
    assert int8["contract"] == "bounded"  # as published: the fault below is what refuses it
    with vqtool.load(export, "onnxruntime", precision="int8") as tokenizer:
        assert tokenizer.contract.name == "bounded"
    int8.update(contract="none", passed=False, failures=["bounded: changed codes' regret p99 9 > 2"])
    (export / "parity.json").write_text(json.dumps(record))
    with pytest.raises(VqtoolError, match="onnxruntime int8 met no contract on this export"):
        vqtool.load(export, "onnxruntime", precision="int8")
    with pytest.raises(VqtoolError, match="no backend could start: onnxruntime on cpu: .* onnxruntime int8 met no"):
        vqtool.load(export, precision="int8")
    with vqtool.load(export) as exact:  # the FP32 graphs stand
        assert exact.contract.name == "exact"
    # vqtool parity measures the refused runtime afresh (its graph is sound), and its record lets it start again.
    remeasured = run_cli("parity", str(export), "--backend", "onnxruntime", "--precision", "int8")
    assert remeasured.returncode == 0, remeasured.stderr
    with vqtool.load(export, "onnxruntime", precision="int8") as again:
        assert again.contract.name == "bounded"
    record = json.loads((export / "parity.json").read_text())
    int8 = next(r for r in record["reports"] if (r["runtime"], r["precision"]) == ("onnxruntime", "int8"))
    int8.update(contract="none", passed=False, failures=["bounded: changed codes' regret p99 9 > 2"])
    (export / "parity.json").write_text(json.dumps(record))
    if importlib.util.find_spec("openvino") is None:
        return

    def openvino_int8() -> object:  # OpenVINO runs outside the test process (see in_subprocess)
        return in_subprocess(f"""
import json, vqtool
try:
    print(json.dumps(vqtool.load({str(export)!r}, "openvino", precision="int8").contract.name))
except vqtool.VqtoolError as exc:
    print(json.dumps(str(exc)))
""")

    refused = str(openvino_int8())
    assert "int8 met no contract on this export on onnxruntime" in refused and "openvino was never check" in refused
    record["reports"].append({**int8, "runtime": "openvino", "provider": "CPU", "contract": "bounded", "passed": True,
                              "failures": []})  # fmt: skip
    (export / "parity.json").write_text(json.dumps(record))
    assert openvino_int8() == "bounded"

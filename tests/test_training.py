"""Training: codebook health, exact resume, interrupts, divergence, data-parallel runs, CIFAR, sweeps."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO, interrupted_then_resumed, run_cli, start_cli, write_photo_folder
from vqtool.errors import VqtoolError
from vqtool.model.checkpoint import load_checkpoint
from vqtool.model.config import ModelConfig, TrainConfig
from vqtool.train.data.memory import default_training_set
from vqtool.train.loop import fit
from vqtool.train.metrics import evaluate

SMALL = ModelConfig(codes=512, dim=64)


@pytest.fixture(scope="module")
def photos():  # noqa: ANN201
    return default_training_set(32)


def _usage(photos, tmp_path: Path, name: str, steps: int, model: ModelConfig = SMALL, **options: object) -> float:  # noqa: ANN001
    config = TrainConfig(steps=steps, batch_size=64, device="cpu", steps_per_epoch=steps, **options)
    result = fit(model, config, photos, tmp_path / name, data_source=None, show_progress=False, log_epochs=False)
    return float(result.final["usage"])


@pytest.fixture(scope="module")
def printed_usage(photos, tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:  # noqa: ANN001
    """Codebook usage of the model as printed (K = 512) after 200 steps."""
    folder = tmp_path_factory.mktemp("printed")
    return {200: _usage(photos, folder, "s200", 200)}


def test_kmeans_init_starts_with_the_codebook_spread_over_the_latents(photos) -> None:  # noqa: ANN001
    """As printed, the codebook starts as uniform(-1/K, 1/K), far from the encoder's outputs, so a few codes take
    every latent; k-means on the latents puts codes where the latents are. Measured right at initialisation:
    a property of the method, not of how two short training runs happen to round on this CPU."""
    from vqtool.model.vqvae import VQVAE, images_to_input
    from vqtool.train.codebook import CodebookHealth

    torch.manual_seed(0)
    model = VQVAE(SMALL).eval()
    images = photos.batch(0, 256, seed=0)
    with torch.no_grad():
        latents = model.encode_latents(images_to_input(torch.from_numpy(images))).reshape(-1, SMALL.dim)
    printed = len(model.quantizer.nearest(latents).unique())
    assert printed < SMALL.codes / 8  # the fault the option exists for: a collapsed start
    CodebookHealth(model.quantizer, TrainConfig(kmeans_init=True)).initialise(latents)
    assert len(model.quantizer.nearest(latents).unique()) >= 0.9 * SMALL.codes


@pytest.mark.slow
def test_restarting_dead_codes_raises_usage_at_512_codes(
    photos,
    tmp_path: Path,  # noqa: ANN001
    printed_usage: dict[int, float],
) -> None:
    assert _usage(photos, tmp_path, "restart", 200, restart_dead=20) > 2 * printed_usage[200]


def test_ema_moves_each_used_code_to_the_mean_of_its_latents_and_the_optimizer_never_does() -> None:
    """The EMA update itself, on latents whose assignment is known: each used code converges to the mean of
    the latents assigned to it (how much that raises usage at 512 codes is measured by
    benchmarks/codebook_health.py over 1,500 steps: 97 against 69 codes)."""
    from vqtool.model.vqvae import Quantizer
    from vqtool.train.codebook import CodebookHealth

    quantizer = Quantizer(4, 2)
    health = CodebookHealth(quantizer, TrainConfig(ema=True, ema_decay=0.5, ema_epsilon=1e-9))
    assert not quantizer.codebook.weight.requires_grad
    latents = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0], [0.0, 6.0]])
    codes = torch.tensor([0, 0, 2, 2, 2])
    for step in range(40):
        health.after_step(latents, codes, step)
    book = quantizer.codebook.weight
    assert torch.allclose(book[0], torch.tensor([2.0, 0.0]), atol=1e-4)
    assert torch.allclose(book[2], torch.tensor([0.0, 4.0]), atol=1e-4)


def test_restarts_are_counted_in_the_metrics(photos, tmp_path: Path) -> None:  # noqa: ANN001
    config = TrainConfig(steps=12, batch_size=32, device="cpu", steps_per_epoch=6, restart_dead=3)
    result = fit(
        ModelConfig(codes=64, dim=16),
        config,
        photos,
        tmp_path / "r",
        data_source=None,
        show_progress=False,
        log_epochs=False,
    )
    records = [json.loads(line) for line in result.metrics.read_text().splitlines()]
    assert records[-1]["restarts"] > 0 and records[-1]["restarts"] >= records[0]["restarts"]


@pytest.mark.parametrize(
    "options",
    [
        {},
        # Slow: the plain run above resumes the same way; these add the codebook options' and averaged state.
        pytest.param({"ema": True, "kmeans_init": True, "restart_dead": 2}, marks=pytest.mark.slow),
        pytest.param({"average_weights": 0.8}, marks=pytest.mark.slow),
    ],
)
def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(photos, tmp_path: Path, options) -> None:  # noqa: ANN001
    model = ModelConfig(codes=32, dim=16)
    config = TrainConfig(steps=10, batch_size=16, device="cpu", steps_per_epoch=3, seed=4, **options)
    whole = fit(model, config, photos, tmp_path / "whole", data_source=None, show_progress=False, log_epochs=False)
    fit(
        model,
        replace(config, steps=5),
        photos,
        tmp_path / "part",
        data_source=None,
        show_progress=False,
        log_epochs=False,
    )
    resumed = fit(
        model, config, photos, tmp_path / "part", data_source=None, resume=True, show_progress=False, log_epochs=False
    )
    assert resumed.steps == whole.steps == 10
    a = torch.load(whole.checkpoint, weights_only=True)
    b = torch.load(resumed.checkpoint, weights_only=True)
    for key in a["model"]:
        assert torch.allclose(a["model"][key], b["model"][key], atol=1e-6), key


def test_averaged_weights_are_what_the_checkpoint_holds_and_validates(photos, tmp_path: Path) -> None:  # noqa: ANN001
    model = ModelConfig(codes=32, dim=16)
    config = TrainConfig(steps=1, batch_size=16, device="cpu", steps_per_epoch=1, average_weights=0.75)
    run = tmp_path / "run"
    fit(model, config, photos, run, data_source=None, show_progress=False, log_epochs=False)
    first = load_checkpoint(run / "checkpoint.pt")
    trained_first = first.extra["trained_weights"]
    # The average starts from the weights after the first step.
    assert all(torch.equal(first.model.state_dict()[k], trained_first[k]) for k in trained_first)
    result = fit(
        model,
        replace(config, steps=2),
        photos,
        run,
        data_source=None,
        resume=True,
        show_progress=False,
        log_epochs=False,
    )
    second = load_checkpoint(run / "checkpoint.pt")
    trained_second, averaged = second.extra["trained_weights"], second.model.state_dict()
    assert second.extra["averaged_steps"] == 2
    for key in trained_second:
        assert not torch.equal(averaged[key], trained_second[key]), key  # the file's model is not the trained one
        expected = 0.75 * trained_first[key] + 0.25 * trained_second[key]
        assert torch.allclose(averaged[key], expected, atol=1e-6), key
    # The figures recorded for the run are those of the model in the file, which export and parity read.
    val = torch.from_numpy(photos.val)
    assert evaluate(second.model, val)[0]["val_mse"] == pytest.approx(result.final["val_mse"], rel=1e-5)
    with pytest.raises(ValueError, match="--average-weights"):
        TrainConfig(average_weights=1.0)


def test_the_cosine_schedule_decays_to_zero_after_its_warm_up_and_constant_stays_the_article_rate() -> None:
    from vqtool.train.schedule import lr_factor

    assert [lr_factor("constant", s, 100, 0) for s in (0, 50, 99)] == [1.0, 1.0, 1.0]
    assert [lr_factor("constant", s, 100, 4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    cosine = [lr_factor("cosine", s, 100, 10) for s in range(100)]
    assert cosine[:10] == [pytest.approx((s + 1) / 10) for s in range(10)]
    assert cosine[10] == 1.0 and cosine[55] == pytest.approx(0.5, abs=0.02) and cosine[99] < 1e-3
    assert all(a >= b for a, b in zip(cosine[10:], cosine[11:], strict=False))
    with pytest.raises(ValueError, match="lr schedule"):
        TrainConfig(lr_schedule="linear")


def test_a_cool_down_lowers_a_constant_rate_linearly_over_the_last_steps() -> None:
    from vqtool.train.schedule import lr_factor

    assert [lr_factor("constant", s, 100, 0, 4) for s in (0, 95, 96, 97, 98, 99)] == [1.0, 1.0, 1.0, 0.75, 0.5, 0.25]
    # Warm-up and cool-down together: the warm-up still starts the run.
    assert [lr_factor("constant", s, 10, 2, 3) for s in range(10)] == pytest.approx([0.5] + [1.0] * 7 + [2 / 3, 1 / 3])
    with pytest.raises(ValueError, match="cooldown"):
        TrainConfig(cooldown_steps=-1)
    with pytest.raises(ValueError, match="cosine"):
        TrainConfig(lr_schedule="cosine", cooldown_steps=10)


def test_a_cosine_run_interrupted_and_resumed_follows_the_same_schedule(photos, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    from vqtool.train import loop

    model = ModelConfig(codes=32, dim=16)
    config = TrainConfig(steps=10, batch_size=16, device="cpu", steps_per_epoch=3, seed=4, lr_schedule="cosine")
    quiet = {"data_source": None, "show_progress": False, "log_epochs": False}
    whole = fit(model, config, photos, tmp_path / "whole", **quiet)
    saved = torch.load(whole.checkpoint, weights_only=True)
    # The rate the optimizer last used is the schedule's, not the base rate: the option bites.
    assert saved["optimizer"]["param_groups"][0]["lr"] == pytest.approx(config.lr * loop.lr_factor("cosine", 9, 10, 0))
    assert saved["optimizer"]["param_groups"][0]["lr"] < config.lr / 10
    resumed = interrupted_then_resumed(
        monkeypatch,
        5,
        lambda: fit(model, config, photos, tmp_path / "part", **quiet),
        lambda: fit(model, config, photos, tmp_path / "part", resume=True, **quiet),
    )
    b = torch.load(resumed.checkpoint, weights_only=True)
    for key in saved["model"]:
        assert torch.allclose(saved["model"][key], b["model"][key], atol=1e-6), key


def _tiny_array(tmp_path: Path) -> Path:
    np.save(tmp_path / "data.npy", np.random.default_rng(0).integers(0, 256, (200, 32, 32, 3), dtype=np.uint8))
    return tmp_path / "data.npy"


def test_ctrl_c_saves_a_checkpoint_and_the_run_resumes(tmp_path: Path) -> None:
    data = _tiny_array(tmp_path)
    process = start_cli(
        "train",
        "--data",
        str(data),
        "--steps",
        "100000",
        "--batch-size",
        "8",
        "--codes",
        "16",
        "--dim",
        "8",
        "--out",
        str(tmp_path / "run"),
    )
    first_grid = tmp_path / "run" / "figures" / "recon_step0000010.png"
    deadline = time.monotonic() + 120
    while not first_grid.exists():
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read() if process.stderr else ""
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "--resume" in stderr
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert 10 <= saved["step"] < 100000
    resumed = run_cli("train", "--resume", str(tmp_path / "run"), "--steps", str(saved["step"] + 5))
    assert resumed.returncode == 0, resumed.stderr
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == saved["step"] + 5


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    data = _tiny_array(tmp_path)
    result = run_cli(
        "train",
        "--data",
        str(data),
        "--steps",
        "50",
        "--batch-size",
        "8",
        "--codes",
        "16",
        "--dim",
        "8",
        "--lr",
        "1e30",
        "--steps-per-epoch",
        "1",
        "--out",
        str(tmp_path / "run"),
    )
    assert result.returncode == 1
    assert "loss became" in result.stderr and "last good checkpoint" in result.stderr
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert saved["step"] >= 1


@pytest.mark.parametrize("source", [pytest.param("array", marks=pytest.mark.slow), "folder"])
def test_two_processes_match_one_on_the_same_global_batch(tmp_path: Path, source: str) -> None:
    """torchrun with gloo on CPU; codebook statistics (EMA, restarts) and the usage term's soft assignments are
    all-reduced across processes. From a folder, each process's reader decodes only that process's slice of every
    global batch.

    What is promised is the same training up to the order of floating-point sums: two processes add their halves'
    gradients where one process adds them all, and which kernel (and so which order) a CPU picks for a half batch
    differs between CPU families. Adam turns any gradient element near zero into a step of the full rate either
    way, so single weights can differ by a few times 1e-6 and more; what the order of sums cannot do is move the
    weights as a whole. So each weight tensor must differ from one process's by under 0.1% of how far training
    moved it, where a run on another global batch (the fault this guards against) differs by over 1%."""
    from vqtool.model.vqvae import VQVAE

    if source == "array":
        data = _tiny_array(tmp_path)
    else:
        data = tmp_path / "photos"
        write_photo_folder(data, 48)
    model = ["--codes", "32", "--dim", "16"]
    common = [
        "--data",
        str(data),
        "--steps",
        "6",
        *model,
        "--ema",
        "--restart-dead",
        "2",
        "--usage-loss",
        "0.1",
        "--average-weights",
        "0.5",
        "--device",
        "cpu",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    # --standalone picks a free port: a fixed one fails whenever another job on the machine holds it.
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two = subprocess.run(
        [*torchrun, "-m", "vqtool", "train", *common, "--batch-size", "16", "--out", str(tmp_path / "two")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    for name, batch in (("one", "16"), ("other-batch", "8")):
        one = run_cli(
            "train", *common, "--batch-size", batch, "--out", str(tmp_path / name), env={"OMP_NUM_THREADS": "1"}
        )
        assert one.returncode == 0, one.stderr
    saved = {
        name: torch.load(tmp_path / name / "checkpoint.pt", weights_only=True) for name in ("one", "two", "other-batch")
    }
    torch.manual_seed(0)  # the runs' seed: the weights training started from
    start = VQVAE(ModelConfig(codes=32, dim=16)).state_dict()
    reference = saved["one"]["model"]
    for key, weights in reference.items():
        moved = float((weights - start[key]).norm())
        assert float((saved["other-batch"]["model"][key] - weights).norm()) > 0.01 * moved, key  # the fault bites
        assert float((saved["two"]["model"][key] - weights).norm()) < 0.001 * moved, key
    assert saved["one"]["extra"]["codebook"]["restarts"] == saved["two"]["extra"]["codebook"]["restarts"] > 0


def test_a_file_one_process_cannot_read_stops_every_process(tmp_path: Path) -> None:
    """Under torchrun a bad file lands in one process's slice of a batch; the others must stop too, not wait
    for it in the gradient reduction until the process group times out (30 minutes)."""
    from vqtool.images.reading import read_rgb

    files = write_photo_folder(tmp_path / "photos", 16)
    write_photo_folder(tmp_path / "val", 4, seed=5)
    files[3].write_bytes(files[3].read_bytes()[:50])
    with pytest.raises(VqtoolError):  # the fault bites
        read_rgb(files[3])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "vqtool"]
    command += ["train", "--data", str(tmp_path / "photos"), "--val-data", str(tmp_path / "val"), "--steps", "4"]
    command += ["--batch-size", "4", "--codes", "16", "--dim", "8", "--device", "cpu", "--out", str(tmp_path / "run")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode != 0 and time.monotonic() - started < 200
    assert f"error: {files[3]}: unreadable or truncated image" in result.stderr
    assert "another process stopped on a training file it could not read" in result.stderr


def test_cifar_batches_folder_trains_with_its_test_batch_as_validation(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, count in [*((f"data_batch_{i}", 20) for i in range(1, 6)), ("test_batch", 12)]:
        batch = {b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8), b"labels": [0] * count}
        (folder / name).write_bytes(pickle.dumps(batch))
    from vqtool.train.data.streaming import load_training_set

    data = load_training_set(folder, 32)
    assert len(data.train) == 100 and data.val.shape == (12, 32, 32, 3)
    result = run_cli(
        "train",
        "--data",
        str(folder),
        "--steps",
        "2",
        "--batch-size",
        "8",
        "--codes",
        "16",
        "--dim",
        "8",
        "--out",
        str(tmp_path / "run"),
    )
    assert result.returncode == 0, result.stderr


def test_sweep_summarises_with_confidence_intervals_and_skips_finished_runs(tmp_path: Path) -> None:
    args = [
        "sweep",
        "--codes",
        "32,8",
        "--dim",
        "8",
        "--seeds",
        "2",
        "--steps",
        "6",
        "--steps-per-epoch",
        "2",
        "--batch-size",
        "8",
        "--data",
        str(_tiny_array(tmp_path)),
        "--out",
        str(tmp_path / "sweep"),
        "--report",
        str(tmp_path / "docs" / "results.md"),
    ]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    rows = json.loads((tmp_path / "sweep" / "summary.json").read_text())["rows"]
    assert [(r["codes"], r["dim"]) for r in rows] == [(8, 8), (32, 8)]  # numeric order, not "32" before "8"
    assert all(r["seeds"] == 2 and r["val_mse_ci95"] >= 0 and len(r["recon_curve"]) == 3 for r in rows)
    for figure in ("curves_K8.png", "curves_K32.png", "curves_grid.png", "heatmap_val_mse.png"):
        assert (tmp_path / "sweep" / "figures" / figure).stat().st_size > 0
        assert (tmp_path / "docs" / "figures" / "sweep" / figure).exists()
    report = (tmp_path / "docs" / "results.md").read_text()
    assert "Lowest validation MSE" in report and "](figures/sweep/curves_K8.png)" in report
    assert sorted(p.name for p in (tmp_path / "docs").iterdir()) == ["figures", "results.md"]  # no temporary left
    assert first.stdout.startswith("| K | D | seeds |")
    assert first.stdout.index("| 8 | 8 | 2 |") < first.stdout.index("| 32 | 8 | 2 |")
    again = run_cli(*args)
    assert again.returncode == 0 and again.stderr.count("finished earlier, skipped") == 4


@pytest.mark.slow  # the sweep path runs by default in the test above
def test_sweep_takes_lists_of_the_family_options_and_shares_one_report_page(tmp_path: Path) -> None:
    data, report = str(_tiny_array(tmp_path)), tmp_path / "docs" / "results.md"
    common = ["--seeds", "2", "--steps", "4", "--steps-per-epoch", "2", "--batch-size", "8", "--data", data]
    capacity = [
        "sweep",
        "--codes",
        "16",
        "--dim",
        "8",
        "--res-blocks",
        "0,1",
        "--channels",
        "8,16,32",
        "--channels",
        "16,32,64",
        *common,
        "--out",
        str(tmp_path / "capacity"),
        "--report",
        str(report),
    ]
    first = run_cli(*capacity)
    assert first.returncode == 0, first.stderr
    rows = json.loads((tmp_path / "capacity" / "summary.json").read_text())["rows"]
    assert {(r["res_blocks"], tuple(r["channels"])) for r in rows} == {
        (b, c) for b in (0, 1) for c in ((8, 16, 32), (16, 32, 64))
    }
    assert (tmp_path / "capacity" / "K16_D8_c16-32-64_rb1" / "seed1" / "checkpoint.pt").exists()
    assert all(r["seeds"] == 2 and r["train_s"] > 0 and r["curve_steps"] == [2, 4] for r in rows)
    assert first.stdout.startswith("| K | D | channels | res blocks | seeds |")
    factors = [
        "sweep",
        "--codes",
        "16",
        "--dim",
        "8",
        "--downsample",
        "16,8",
        "--lookup-dim",
        "0,4",
        "--title",
        "Factors",
    ]
    second = run_cli(
        *factors, "--l2-codes", "yes", *common, "--out", str(tmp_path / "factors"), "--report", str(report)
    )
    assert second.returncode == 0, second.stderr
    assert "| K | D | factor | lookup dim | seeds |" in second.stdout
    text = report.read_text()
    assert text.count("## Results:") == 2 and "sweep over K, D, channels, res blocks" in text
    assert "## Results: Factors" in text
    assert "At each recorded step:" in text  # two records a run: a table of both steps
    for key, figure in (("capacity", "curves.png"), ("factors-factors", "final_psnr.png")):
        assert f"](figures/{key}/{figure})" in text and (report.parent / "figures" / key / figure).stat().st_size > 0
    again = run_cli(*capacity)  # re-summarised: its section is replaced, not added again
    assert again.returncode == 0 and again.stderr.count("finished earlier, skipped") == 8
    assert report.read_text().count("## Results:") == 2
    bad = run_cli("sweep", "--l2-codes", "maybe", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 1 and "--l2-codes takes comma-separated yes/no values" in bad.stderr


def test_python_users_plan_train_and_resume_runs_as_the_cli_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vqtool.train.run: a preset overridden by the options given, the next free run folder, resume with the run's
    own plan, and the refusal to start a new run over an old one."""
    from vqtool.errors import VqtoolError
    from vqtool.train.run import new_run, next_run_dir, resume_run, train

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "run-001").mkdir(parents=True)
    assert next_run_dir() == Path("runs/run-002")
    plan = new_run(preset="f8", codes=64, steps=2, batch_size=8, steps_per_epoch=2, device="cpu")
    assert plan.run_dir == Path("runs/run-002") and not plan.resume
    assert (plan.model_config.codes, plan.model_config.downsample, plan.train_config.lr) == (64, 8, 2e-3)
    said: list[str] = []
    first = train(plan, log=said.append)
    assert first.steps == 2 and any(line.startswith("data: embedded default photographs") for line in said)
    with pytest.raises(VqtoolError, match="already holds a run"):
        new_run(out=plan.run_dir)
    again = resume_run(plan.run_dir, steps=4)
    assert again.resume and again.model_config == plan.model_config and again.train_config.lr == 2e-3
    assert train(again, log=said.append).steps == 4

"""What the Python API adds to a bare ONNX Runtime session on the same graph (goal: at most 10% at batch 1).

    python -m benchmarks.api_overhead [--export EXPORT_DIR] [--batch 1 --batch 32] [--seconds 4] [--rounds 10]

Contenders, timed in alternating rounds in one process (these VMs drift by +-30% over seconds; each
ratio is the median of per-round ratios):
- `tok.encode(images)` / `tok.decode(codes)` from `vqtool.load(EXPORT_DIR)`;
- a bare `InferenceSession(graph, providers=["CPUExecutionProvider"]).run(None, {input: batch})` with ONNX
  Runtime's default options.

Without --export, the default model is trained for 150 steps and exported under benchmarks/work/api/.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "benchmarks" / "work" / "api"


def default_export() -> Path:
    export = WORK / "export"
    if not (export / "manifest.json").exists():
        run = [sys.executable, "-m", "vqtool"]
        subprocess.run([*run, "train", "--steps", "150", "--out", str(WORK)], cwd=REPO, check=True)
        subprocess.run([*run, "export", str(WORK / "checkpoint.pt"), "--out", str(export)], cwd=REPO, check=True)
    return export


def bare_session(graph: Path):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    return ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])


def measure(tok, stage, graph, api, data, feed, batch, args) -> None:  # type: ignore[no-untyped-def]
    """One table row: the API against the bare session, in alternating rounds."""
    from vqtool.bench.timing import time_interleaved

    session = bare_session(graph)
    name = session.get_inputs()[0].name
    timed = time_interleaved(
        [lambda: session.run(None, {name: feed}), lambda: api(data)],
        batch,
        seconds=args.seconds * 2,
        rounds=args.rounds,
    )
    (bare, bare_rounds), (api_timing, api_rounds) = timed
    # Overhead as time per call: API time / bare time - 1, the median over rounds.
    overhead = float(np.median(np.divide(bare_rounds, api_rounds))) - 1
    print(
        f"| {stage} | {batch} | {bare.p50_ms * 1e3:.0f} µs | {api_timing.p50_ms * 1e3:.0f} µs | {overhead:+.1%} |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, default=None)
    parser.add_argument("--batch", type=int, action="append", default=None)
    parser.add_argument("--seconds", type=float, default=4.0, help="timed seconds per contender, over all rounds")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()

    import vqtool

    export = args.export or default_export()
    tok = vqtool.load(export, backend="onnxruntime", device="cpu")
    print(f"{export}: {tok.describe()}")
    rng = np.random.default_rng(0)
    grid = tok.grid(tok.image_size, tok.image_size)
    print("| stage | batch | bare InferenceSession.run | vqtool API | API overhead |")
    print("|---|---|---|---|---|")
    for batch in args.batch or [1, 32]:
        images = rng.integers(0, 256, (batch, tok.image_size, tok.image_size, 3), dtype=np.uint8)
        codes = rng.integers(0, tok.num_codes, (batch, *grid)).astype(tok.code_dtype)
        measure(tok, "encode", export / "encoder.onnx", tok.encode, images, images, batch, args)
        measure(tok, "decode", export / "decoder.onnx", tok.decode, codes, codes.astype(np.int32), batch, args)
    print("µs: median latency per call. Overhead: API time per call / bare session's - 1, median over rounds.")


if __name__ == "__main__":
    main()

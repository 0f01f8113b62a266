"""What each codebook-health option does to usage and validation PSNR at K = 512, on the embedded data.

    python -m benchmarks.codebook_health [--steps 1500] [--work DIR]

Trains the reference model (K = 512, D = 256) once as printed and once with each of --ema,
--kmeans-init and --restart-dead 100 (and all three), same seed and data, and prints a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "as printed": [],
    "--ema": ["--ema"],
    "--kmeans-init": ["--kmeans-init"],
    "--restart-dead 100": ["--restart-dead", "100"],
    "all three": ["--ema", "--kmeans-init", "--restart-dead", "100"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "work" / "codebook_health")
    args = parser.parse_args()
    rows = []
    for index, (name, flags) in enumerate(VARIANTS.items()):
        run = args.work / f"variant{index}"
        if not (run / "metrics.jsonl").exists():
            started = time.perf_counter()
            command = [
                sys.executable,
                "-m",
                "vqtool",
                "train",
                "--codes",
                "512",
                "--steps",
                str(args.steps),
                "--out",
                str(run),
                *flags,
            ]
            subprocess.run(command, cwd=REPO, check=True, capture_output=True)
            print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
        final = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
        rows.append((name, final))
    print(f"\nK = 512, D = 256, {args.steps} steps, batch 128, seed 0, embedded data")
    print("| variant | codes used | usage | perplexity | val PSNR (dB) | val MSE | restarts |")
    print("|---|---|---|---|---|---|---|")
    for name, final in rows:
        print(
            f"| {name} | {int(final['codes_used'])} | {final['usage']:.1%} | {final['perplexity']:.1f} | "
            f"{final['val_psnr']:.2f} | {final['val_mse']:.4f} | {final['restarts']} |"
        )


if __name__ == "__main__":
    main()

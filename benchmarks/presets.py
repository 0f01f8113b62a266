"""Quality of the presets on the embedded data: validation PSNR, codes in use and training time.

    python -m benchmarks.presets [--steps 1500] [--presets seed,f8,f4] [--work DIR]

Trains `vqtool train --preset NAME` for each preset (1,500 steps, batch 128, seed 0: the issue's
protocol) and prints a table. Finished runs are read back, not retrained. The goals: f8 >= 25.0 dB and
f4 >= 27.0 dB validation PSNR, each with >= 95% of its codes in use on the validation set.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOALS = {"f8": 25.0, "f4": 27.0}
MIN_USAGE = 0.95


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--presets", default="seed,f8,f4")
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "work" / "presets")
    args = parser.parse_args()
    rows = []
    for name in args.presets.split(","):
        run = args.work / name
        if not (run / "metrics.jsonl").exists():
            started = time.perf_counter()
            command = [sys.executable, "-m", "vqtool", "train", "--preset", name, "--steps", str(args.steps)]
            subprocess.run([*command, "--out", str(run)], cwd=REPO, check=True, capture_output=True)
            print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
        final = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
        rows.append((name, final))
    print(f"\n{args.steps} steps, batch 128, seed 0, embedded data (448 validation images)")
    print("| preset | val PSNR (dB) | codes used | usage | training time | goal |")
    print("|---|---|---|---|---|---|")
    for name, final in rows:
        goal = GOALS.get(name)
        target = ""
        if goal is not None:
            met = final["val_psnr"] >= goal and final["usage"] >= MIN_USAGE
            target = f">= {goal} dB, >= 95% used: {'met' if met else 'NOT met'}"
        print(
            f"| {name} | {final['val_psnr']:.2f} | {int(final['codes_used'])} | {final['usage']:.1%} | "
            f"{final.get('elapsed_s', 0):.0f} s | {target} |"
        )


if __name__ == "__main__":
    main()

"""What `vqtool encode --engine ray` costs against the local engine on the same files, and the driver's memory.

    python -m benchmarks.ray_engine [--sizes 20000 200000] [--rounds 2] [--export EXPORT_DIR] [--out results.json]

For each size, in alternating rounds (these VMs drift by +-30%; each ratio is the median of per-round ratios):
- local: `vqtool encode FOLDER --model EXPORT --out codes.npy`;
- ray, cold: the same with `--engine ray`, which starts a local Ray instance and stops it (what one command costs);
- ray, warm: `--engine ray --ray-address ADDR` against a cluster started once with `ray start --head` (what a job
  on a running cluster costs: tasks, actors and the join, without the cluster's start);
- ray floor: `python -m benchmarks.ray_floor N --ray-address ADDR` on the same warm cluster, the engine's Ray Data
  pipeline with nothing in it (no image read, no graph run), which no engine on Ray Data can go under; reported
  in seconds beside the local engine's.
Every run is a real `vqtool` process; images/s counts from the process's start to its end. The peak RSS is the
driver's own (the `vqtool` process), not Ray's workers'. The images are 32x32 PNG crops of photographs, the
default model's size: the cheapest images to encode, so the engine's own costs weigh the most.

Without --export, the default model is trained for 150 steps and exported under benchmarks/work/api/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "benchmarks" / "work" / "ray"
# The encode command in a process that reports its own peak RSS (ru_maxrss, KiB on Linux) on its last line.
PROBE = (
    "import resource, sys\n"
    "from vqtool.cli import main\n"
    "sys.argv = ['vqtool', *sys.argv[1:]]\n"
    "try:\n    main()\nexcept SystemExit as stop:\n    assert not stop.code, stop.code\n"
    "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)\n"
)


def encode_once(args: list[str]) -> tuple[float, float]:
    """(seconds, driver peak RSS in MiB) of one `vqtool encode ARGS` process."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", PROBE, "encode", *args], cwd=REPO, capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"vqtool encode {' '.join(args)} failed:\n{done.stderr}")
    return seconds, int(done.stdout.strip().splitlines()[-1]) / 1024


def floor_once(rows: int, address: str) -> float:
    """Seconds of one `python -m benchmarks.ray_floor` process (benchmarks/ray_floor.py)."""
    started = time.perf_counter()
    command = [sys.executable, "-m", "benchmarks.ray_floor", str(rows), "--ray-address", address]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"benchmarks.ray_floor failed:\n{done.stderr}")
    return time.perf_counter() - started


def start_cluster() -> str:
    ray = REPO / ".venv" / "bin" / "ray"
    command = [
        str(ray) if ray.exists() else "ray",
        "start",
        "--head",
        "--include-dashboard=false",
        "--disable-usage-stats",
    ]
    subprocess.run(command, check=True, capture_output=True)
    return "auto"


def stop_cluster() -> None:
    ray = REPO / ".venv" / "bin" / "ray"
    subprocess.run([str(ray) if ray.exists() else "ray", "stop", "--force"], check=False, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--export", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--out", type=Path, default=None, help="also write the figures here as JSON")
    args = parser.parse_args()

    from benchmarks.api_overhead import default_export
    from benchmarks.streaming import make_png_folder
    from vqtool.host import cpu_description

    export = args.export or default_export()
    results = {"machine": cpu_description(), "sizes": []}
    for size in args.sizes:
        folder = make_png_folder(args.work / f"png{size}", size)
        out = args.work / "codes.npy"
        common = [str(folder), "--model", str(export), "--out", str(out), "--overwrite"]  # each round writes it again
        times: dict[str, list[float]] = {"local": [], "ray cold": [], "ray warm": [], "ray floor": []}
        memory: dict[str, float] = {}
        for _ in range(args.rounds):
            for name, extra in (("local", []), ("ray cold", ["--engine", "ray"]), ("ray warm", None)):
                if extra is None:
                    address = start_cluster()
                    try:
                        seconds, rss = encode_once([*common, "--engine", "ray", "--ray-address", address])
                        floor = floor_once(size, address)
                    finally:
                        stop_cluster()
                else:
                    seconds, rss = encode_once([*common, *extra])
                times[name].append(seconds)
                memory[name] = max(memory.get(name, 0.0), rss)
                print(
                    f"{size} images, {name}: {size / seconds:.0f} images/s, driver peak RSS {rss:.0f} MiB", flush=True
                )
                if extra is None:
                    times["ray floor"].append(floor)
                    print(f"{size} images, ray floor: {floor:.1f} s ({size / floor:.0f} rows/s)", flush=True)
        # The floor encodes nothing: it is reported in seconds, beside the local engine's, not as a rate.
        floor = times.pop("ray floor")
        ratios = {
            name: statistics.median(local / other for local, other in zip(times["local"], runs, strict=True))
            for name, runs in times.items()
        }
        row = {
            "images": size,
            "images_per_s": {name: size / statistics.median(runs) for name, runs in times.items()},
            "seconds": {"local": statistics.median(times["local"]), "ray floor": statistics.median(floor)},
            "vs_local": ratios,
            "driver_peak_rss_mib": memory,
        }
        results["sizes"].append(row)
        print(json.dumps(row, indent=2), flush=True)
    print(f"machine: {results['machine']}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

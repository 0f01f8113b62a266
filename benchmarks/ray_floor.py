"""What `--engine ray`'s Ray Data pipeline costs with nothing in it: the floor under any Ray engine's overhead.

    python -m benchmarks.ray_floor ROWS [--ray-address ADDR]

The engine's shape, row for row: a table of ROWS row numbers in blocks of the engine's size, a map that makes
blank 32x32 pixels (the decode tasks' place), a pool of one actor per CPU that returns blank codes (the
tokenizers' place), the blocks streamed back to the driver; then Ray is left. No image is read and no graph
runs, so the process's time is what Ray and Ray Data themselves take: connecting or starting, starting the
actors, moving the blocks, shutting down. benchmarks/ray_engine.py times it as a process, like the encodes.
"""

from __future__ import annotations

import argparse

import numpy as np

from vqtool.ray.engine import MAX_BLOCK_ROWS, ray_session


class BlankCodes:
    """The tokenizer actors' place: blank codes for every row."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"index": batch["index"], "codes": np.zeros((len(batch["index"]), 4, 4), np.uint8)}


def blank_pixels(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"index": batch["index"], "pixels": np.zeros((len(batch["index"]), 32, 32, 3), np.uint8)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rows", type=int)
    parser.add_argument("--ray-address", default=None)
    args = parser.parse_args()

    import pyarrow as pa
    import ray
    import ray.data

    with ray_session(ray, args.ray_address) as cpus:  # what the engine does: the same settings, start and stop
        blocks = max(cpus, -(-args.rows // MAX_BLOCK_ROWS))
        dataset = ray.data.from_arrow(pa.table({"index": np.arange(args.rows)}), override_num_blocks=blocks)
        dataset = dataset.map_batches(blank_pixels, batch_size=None, batch_format="numpy")
        dataset = dataset.map_batches(BlankCodes, concurrency=cpus, batch_size=64, batch_format="numpy")
        rows = sum(len(block["index"]) for block in dataset.iter_batches(batch_size=None, batch_format="numpy"))
    assert rows == args.rows, (rows, args.rows)


if __name__ == "__main__":
    main()

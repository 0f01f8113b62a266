"""The latent graphs against the library's own eager code, at the model's size, batch 4.

    python -m benchmarks.latents CHECKPOINT [CHECKPOINT ...] [--work DIR] [--rounds 3] [--calls 5] [--fp16] [--bf16]
        [--backend onnxruntime|openvino|torch ...]

For each imported checkpoint (a diffusers VQModel: latent diffusion's VQ-f4 / VQ-f8, Kandinsky's MoVQ): exports it
with `--latents` (FP32, and FP16 with --fp16; parity on 8 of the embedded photographs), then times, in alternating
rounds of one run, the library's `decode(latents, force_not_quantize=...)` as the model's pipeline calls it and its
`encode(x).latents`, against vqtool's latent graphs on ONNX Runtime and OpenVINO (the CPU, one process, all cores).
With --bf16 the export checks BF16 on OpenVINO and PyTorch too, each timed where its parity held, beside what a
user does today: the library's eager code under `torch.autocast("cpu", dtype=torch.bfloat16)` (its decode PSNR
against the FP32 decode printed with it, as nothing else checks it).
The goals: the latent decoder in FP32 >= 1.2x the library's eager decode; the best published reduced precision
>= 2x. Prints the ratios (median call of each round) and each graph's parity against the library, and for FP32
decode the arithmetic rate each contender reached against a 1024 x 1024 FP32 matrix product timed in each round
(the decoder's FLOPs counted from its layers as they run: convolutions, linear layers, attention).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

BATCH = 4
BACKENDS = ("onnxruntime", "openvino", "torch")
GRAPHS = {"encode": "encoder_latents", "decode": "decoder_latents"}  # the graph each timed stage runs


def _median_seconds(call: Callable[[], Any], calls: int) -> float:
    call()  # warm-up
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def decode_flop(library: Any, latents: torch.Tensor, quantize: bool) -> dict[str, float]:
    """FLOPs of the library's decode of one latent (N = 1): convolutions and linear layers from their output shapes,
    attention (scores and weighted sum) from its query and key lengths."""
    macs = {"convolutions": 0, "linear": 0, "attention": 0}

    def count(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if isinstance(module, torch.nn.Conv2d):
            fan_in = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            macs["convolutions"] += output.numel() * fan_in
        else:
            macs["linear"] += output.numel() * int(module.in_features)  # type: ignore[arg-type]

    attention = torch.nn.functional.scaled_dot_product_attention

    def counted_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        macs["attention"] += q.shape[:-1].numel() * k.shape[-2] * (q.shape[-1] + v.shape[-1])
        return attention(q, k, v, *args, **kwargs)

    layers = (torch.nn.Conv2d, torch.nn.Linear)
    hooks = [m.register_forward_hook(count) for m in library.modules() if isinstance(m, layers)]
    torch.nn.functional.scaled_dot_product_attention = counted_attention  # type: ignore[assignment]
    try:
        with torch.no_grad():
            library.decode(latents, force_not_quantize=not quantize)
    finally:
        torch.nn.functional.scaled_dot_product_attention = attention
        for hook in hooks:
            hook.remove()
    return {name: 2.0 * count for name, count in macs.items()}


def measure(
    checkpoint: Path, work: Path, rounds: int, calls: int, fp16: bool, bf16: bool, backends: tuple[str, ...]
) -> None:
    import vqtool
    from vqtool.bench.model_only import fp32_matmul_flops
    from vqtool.export.pipeline import export_model
    from vqtool.formats.records import read_latent_reports, runtime_record
    from vqtool.images.embedded import embedded_photographs
    from vqtool.model.checkpoint import load_checkpoint

    model = load_checkpoint(checkpoint).model
    size = model.config.image_size
    photos = embedded_photographs(size)
    export = work / f"{checkpoint.stem}-latents"
    if not (export / "manifest.json").exists():
        export_model(
            checkpoint, export, parity_images=photos[:8], latents=True, fp16=fp16, bf16=bf16, log=lambda _: None
        )
    print(f"{checkpoint.stem}: exported", flush=True)
    manifest = vqtool.load(export, "onnxruntime", "cpu", lazy=True).manifest
    quantize = manifest.latent_decode == "quantize"
    images = photos[:BATCH]
    x = model.model_input(torch.from_numpy(np.ascontiguousarray(images)))
    library = model.library_model
    with torch.no_grad():
        latents = library.encode(x).latents
    array = latents.numpy()

    def eager_decode() -> Any:
        with torch.no_grad():
            return library.decode(latents, force_not_quantize=not quantize).sample

    def eager_encode() -> Any:
        with torch.no_grad():
            return library.encode(x).latents

    def autocast_decode() -> Any:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return library.decode(latents, force_not_quantize=not quantize).sample

    def autocast_encode() -> Any:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return library.encode(x).latents

    # What each contender times: {"encode": call, "decode": call}; a BF16 latent graph that missed its rule is left
    # out, as no runtime starts it.
    contenders: dict[str, dict[str, Callable[[], Any]]] = {"eager": {"encode": eager_encode, "decode": eager_decode}}
    if bf16:
        contenders["eager under bf16 autocast"] = {"encode": autocast_encode, "decode": autocast_decode}
        reference, rounded = eager_decode().float(), autocast_decode().float()
        error = float(((reference.clamp(-1, 1) - rounded.clamp(-1, 1)) ** 2).mean()) / 4  # on a [0, 1] scale
        print(f"  eager under bf16 autocast: decode {10 * np.log10(1 / max(error, 1e-20)):.1f} dB from FP32's")
    opened = []
    # ONNX Runtime's CPU provider has no FP16 kernels (it computes FP16 graphs in FP32 behind casts): timed on
    # request only.
    precisions = ["fp32"] + (["fp16"] if fp16 and "decoder_latents.fp16" in manifest.graphs else [])
    reports = read_latent_reports(export)
    offered = {
        "onnxruntime": precisions,
        "openvino": ["fp32", "bf16"] if bf16 else ["fp32"],
        "torch": ["bf16"] if bf16 else [],  # its FP32 is the library's own code: eager
    }
    for backend in backends:
        for precision in offered[backend]:
            report = runtime_record(reports, backend, precision)
            # Timed where parity.json does not refuse it (FP32 on OpenVINO is not checked by the export).
            held = {stage for stage, role in GRAPHS.items() if report is None or not report.failures_of(role)}
            if not held or (precision == "bf16" and report is None):
                continue
            tok = vqtool.load(export, backend, "cpu", precision=precision, lazy=True)
            opened.append(tok)
            calls_of = {
                "encode": lambda tok=tok: tok.encode_latents(images),
                "decode": lambda tok=tok: tok.decode_latents(array),
            }
            contenders[f"{backend} {precision}"] = {stage: calls_of[stage] for stage in sorted(held)}
    flop = decode_flop(library, latents[:1], quantize)  # per image: one is enough to count
    seconds: dict[tuple[str, str], list[float]] = {}
    matmul_rates = []
    for _ in range(rounds):
        matmul_rates.append(fp32_matmul_flops())
        for name, calls_by_stage in contenders.items():
            for stage, call in calls_by_stage.items():
                seconds.setdefault((name, stage), []).append(_median_seconds(call, calls))
            took = ", ".join(f"{stage} {seconds[(name, stage)][-1]:.3f} s" for stage in calls_by_stage)
            print(f"  {name}: {took}", flush=True)
    for tok in opened:
        tok.close()
    print(f"\n{checkpoint.stem} at {size}x{size}, batch {BATCH}, latents decoded {manifest.latent_decode}")
    print("| runtime | encode_latents x eager (per round) | decode_latents x eager (per round) |")
    print("| --- | --- | --- |")
    for name in contenders:
        cells = []
        for stage in ("encode", "decode"):
            if (name, stage) not in seconds:
                cells.append("refused")
                continue
            ratios = [e / s for e, s in zip(seconds[("eager", stage)], seconds[(name, stage)], strict=True)]
            cells.append(" / ".join(f"{r:.2f}x" for r in ratios))
        print(f"| {name} | {cells[0]} | {cells[1]} |")
    counted = ", ".join(f"{name} {value / 1e9:.1f}" for name, value in flop.items())
    rate = max(matmul_rates)
    print(f"\ndecode: {sum(flop.values()) / 1e9:.1f} GFLOP per image ({counted}); a 1024x1024 FP32 matrix product "
          f"ran at {' / '.join(f'{r / 1e9:.0f}' for r in matmul_rates)} GFLOP/s per round")  # fmt: skip
    for name in contenders:
        if (name, "decode") in seconds and not name.endswith(("bf16", "fp16", "autocast")):
            rates = [sum(flop.values()) * BATCH / s for s in seconds[(name, "decode")]]
            print(f"  {name} decode: " + " / ".join(f"{r / 1e9:.0f} GFLOP/s ({r / rate:.0%})" for r in rates))
    for report in reports:
        verdict = "passed" if report.passed else "; ".join(report.failures)
        print(
            f"parity {report.runtime} {report.precision}: latents within {report.latent_error:.2g}, decode "
            f"{report.decode_psnr:.1f} dB, {verdict}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--work", type=Path, default=Path("/tmp/vqtool-latents"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--fp16", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument(
        "--backend", action="append", choices=BACKENDS, help="vqtool's runtimes to time (default: all); repeatable"
    )
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    for checkpoint in args.checkpoints:
        measure(checkpoint, args.work, args.rounds, args.calls, args.fp16, args.bf16, tuple(args.backend or BACKENDS))


if __name__ == "__main__":
    main()

"""Where an INT8 encoder's code changes come from: input, weight or output rounding, convolution by convolution.

    python -m benchmarks.int8_errors CHECKPOINT

Quantizes the checkpoint's encoder with every convolution INT8, as `vqtool export --int8` calibrates it, then
replays its rounding in PyTorch with the graph's own scales and zero points, one source at a time: each
convolution's input activations, its per-channel weights, its output. For each it prints the share of the
validation images' codes left identical to PyTorch's. The rounding of all sources together comes within a few
tenths of a percent of what ONNX Runtime gives (printed above it), so the sources can be compared.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    args = parser.parse_args()

    import onnx
    import torch
    from onnx import numpy_helper

    from benchmarks.int8_layers import quantizable
    from vqtool.export.graphs import write_graphs
    from vqtool.export.quantize import bounded_judge, write_int8_encoder
    from vqtool.model.vqvae import images_to_input

    start = quantizable(args.checkpoint)
    model, data, calibration, reference = start.model, start.data, start.calibration, start.reference.codes
    with tempfile.TemporaryDirectory(prefix="vqtool-int8-errors-") as scratch:
        work = Path(scratch)
        fp32 = write_graphs(model, "benchmark", work, "fp32")["encoder"]
        entry = write_int8_encoder(work, fp32, calibration)
        onnx_runtime = bounded_judge(model, data.val)(work / entry.file)[0]
        graph = onnx.load(str(work / entry.file)).graph

    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    made_by = {out: node for node in graph.node for out in node.output}

    def scale_and_zero(dequantize: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray]:
        return values[dequantize.input[1]], values[dequantize.input[2]]

    # Per graph convolution, in the encoder's order: (input scale, input zero point, dequantized weights,
    # output scale, output zero point); the output's are None where nothing quantizes it.
    rounding = []
    for conv in (n for n in graph.node if n.op_type == "Conv"):
        in_scale, in_zero = scale_and_zero(made_by[conv.input[0]])
        weights = made_by[conv.input[1]]
        w_scale, _ = scale_and_zero(weights)
        dequantized = values[weights.input[0]].astype(np.float32) * w_scale.reshape(-1, 1, 1, 1)
        after = [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == conv.output[0]]
        out = (values[after[0].input[1]], values[after[0].input[2]]) if after else (None, None)
        rounding.append((float(in_scale), int(in_zero), dequantized, *out))
    convs = [
        m
        for m in itertools.chain(model.encoder.modules(), model.before_quantize.modules())
        if isinstance(m, torch.nn.Conv2d)
    ]
    assert len(convs) == len(rounding), "the graph's convolutions are the model's"

    def fake_quantize(x: torch.Tensor, scale: float, zero: int) -> torch.Tensor:
        return (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale

    def rounds_input(scale: float, zero: int) -> Callable:
        return lambda _module, args: (fake_quantize(args[0], scale, zero),)

    def rounds_output(scale: float, zero: int) -> Callable:
        return lambda _module, _args, output: fake_quantize(output, scale, zero)

    nothing: frozenset[int] = frozenset()

    def identical(
        inputs: frozenset[int] = nothing, weights: frozenset[int] = nothing, outputs: frozenset[int] = nothing
    ) -> float:
        """The share of PyTorch's codes kept when the given convolutions' inputs, weights and outputs are rounded."""
        hooks, originals = [], []
        for index, (conv, (in_scale, in_zero, dequantized, out_scale, out_zero)) in enumerate(
            zip(convs, rounding, strict=True)
        ):
            if index in weights:
                originals.append((conv, conv.weight.data))
                conv.weight.data = torch.from_numpy(dequantized)
            if index in inputs:
                hooks.append(conv.register_forward_pre_hook(rounds_input(in_scale, in_zero)))
            if index in outputs and out_scale is not None:
                hooks.append(conv.register_forward_hook(rounds_output(float(out_scale), int(out_zero))))
        try:
            with torch.no_grad():
                pixels = torch.from_numpy(data.val)
                starts = range(0, len(pixels), 256)
                codes = torch.cat([model.encode(images_to_input(pixels[s : s + 256])) for s in starts])
        finally:
            for handle in hooks:
                handle.remove()
            for conv, weight in originals:
                conv.weight.data = weight
        return float((codes.numpy() == reference).mean())

    every = frozenset(range(len(convs)))
    print(f"\n{len(data.val)} validation images; every convolution INT8, each ReLU folded into its convolution")
    print(f"ONNX Runtime's INT8 graph: {onnx_runtime:.1%} identical codes")
    print("| rounding replayed in PyTorch | identical codes |")
    print("|---|---|")
    print(f"| all of it | {identical(every, every, every):.1%} |")
    print(f"| inputs only | {identical(inputs=every):.1%} |")
    print(f"| weights only | {identical(weights=every):.1%} |")
    print(f"| outputs only | {identical(outputs=every):.1%} |")
    print("\n| convolution | input | weights | output (zero point) |")
    print("|---|---|---|---|")
    for index, (_, _, _, _, out_zero) in enumerate(rounding):
        zero = "" if out_zero is None else f" ({int(out_zero)})"
        print(
            f"| {index} | {identical(inputs=frozenset({index})):.1%} | {identical(weights=frozenset({index})):.1%} | "
            f"{identical(outputs=frozenset({index})):.1%}{zero} |"
        )


if __name__ == "__main__":
    main()

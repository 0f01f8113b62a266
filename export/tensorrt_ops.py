"""A static check that a graph stays inside what TensorRT's ONNX parser accepts.

From onnx-tensorrt's operator matrix for TensorRT 10 (docs/operators.md): opsets 9..20 are
supported by every 10.x release, UINT8 may appear only as a network input or output, and each
operator supports the element types listed here. Only the operators our graphs may contain are
listed; anything else is reported, so a change to the exporter cannot slip in an unsupported op.
"""

from __future__ import annotations

import onnx

TRT_MAX_OPSET = 20
_F = {"FLOAT", "FLOAT16", "BFLOAT16"}
_I = {"INT32", "INT64"}
TRT_OPS: dict[str, set[str]] = {
    "Add": _F | _I,
    "Sub": _F | _I,
    "Mul": _F | _I,
    "Div": _F | _I,
    "Conv": _F,
    "ConvTranspose": _F,
    "MatMul": _F,
    "Gemm": _F,
    "Relu": _F | _I,
    "Tanh": _F,
    "Clip": _F,
    "Round": _F,
    "Sqrt": _F,
    "Max": _F | _I,
    "ReduceSum": _F | _I,
    "ArgMin": _F | _I,
    "ArgMax": _F | _I,
    "Cast": _F | _I | {"UINT8", "BOOL"},
    "Gather": _F | _I | {"BOOL"},
    "Transpose": _F | _I | {"BOOL"},
    "Reshape": _F | _I | {"BOOL"},
    "Identity": _F | _I | {"BOOL"},
    "Unsqueeze": _F | _I | {"BOOL"},
    "Squeeze": _F | _I | {"BOOL"},
    "Concat": _F | _I | {"BOOL"},
    "Shape": _F | _I | {"BOOL"},
    "Slice": _F | _I | {"BOOL"},
    "Constant": _F | _I | {"BOOL"},
    "Pad": _F | _I,
    "DepthToSpace": _F | _I,
    # What imported models add: GroupNorm (exported as InstanceNormalization), SiLU, attention's Softmax, nearest
    # upsampling, and Emu3's temporal layers (BatchNorm3d, the repeated frames).
    "InstanceNormalization": _F,
    "BatchNormalization": _F,
    "Sigmoid": _F,
    "Softmax": _F,
    "Resize": _F,
    "Expand": _F | _I | {"BOOL"},
    "Tile": _F | _I | {"BOOL"},
}
# Inputs that are shapes, not data (Resize's roi, scales and sizes): the type list is about the data.
SHAPE_INPUTS = {"Resize": {1, 2, 3}}
# Resize's restrictions in the matrix: these modes and coordinate transformations only.
RESIZE_MODES = {"nearest", "linear"}
RESIZE_TRANSFORMS = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}


def _type_name(elem_type: int) -> str:
    return onnx.TensorProto.DataType.Name(elem_type)


def _resize_problems(node: onnx.NodeProto) -> list[str]:
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    mode = attributes.get("mode", b"nearest").decode()
    transform = attributes.get("coordinate_transformation_mode", b"half_pixel").decode()
    if mode not in RESIZE_MODES or transform not in RESIZE_TRANSFORMS:
        return [f"{node.name}: Resize in mode {mode} with {transform} coordinates is not supported by TensorRT"]
    return []


def trt_problems(model: onnx.ModelProto) -> list[str]:
    """Reasons TensorRT's parser would reject this graph; empty when it is within the matrix."""
    problems = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset > TRT_MAX_OPSET:
        problems.append(f"opset {opset} is above {TRT_MAX_OPSET}, the highest every TensorRT 10 parser reads")
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    types = {v.name: _type_name(v.type.tensor_type.elem_type) for v in inferred.graph.value_info}
    io_names = {v.name for v in (*model.graph.input, *model.graph.output)}
    types.update({v.name: _type_name(v.type.tensor_type.elem_type) for v in (*model.graph.input, *model.graph.output)})
    types.update({t.name: _type_name(t.data_type) for t in model.graph.initializer})
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{node.name or node.op_type}: custom-domain op {node.domain}.{node.op_type}")
            continue
        allowed = TRT_OPS.get(node.op_type)
        if allowed is None:
            problems.append(f"{node.name or node.op_type}: {node.op_type} is not in the TensorRT operator list")
            continue
        if node.op_type == "Resize":
            problems.extend(_resize_problems(node))
        skipped = SHAPE_INPUTS.get(node.op_type, set())
        data = [name for index, name in enumerate(node.input) if index not in skipped]
        for tensor in (*data, *node.output):
            kind = types.get(tensor)
            if not tensor or kind is None:
                continue
            if kind == "UINT8" and tensor not in io_names:
                problems.append(
                    f"{node.name}: UINT8 tensor {tensor} inside the network (TensorRT allows it only as I/O)"
                )
            elif kind not in allowed and not (node.op_type == "Cast" and kind == "UINT8"):
                problems.append(f"{node.name}: {node.op_type} on {kind} is not supported by TensorRT")
    return problems

"""What an ONNX graph file refers to outside itself, read without the `onnx` package (the runtime install lacks it).

A tensor in an ONNX file may keep its bytes in another file (`external_data`), named by a path that the runtime
resolves beside the graph. vqtool's exports never do that, and a graph from someone else that does could make the
runtime read any file it names: such graphs are refused before a runtime opens them. The protobuf is walked just
deep enough to reach every tensor a graph can hold (initializers, sparse initializers, constant attributes,
subgraphs of If and Loop, functions, training graphs), skipping every byte string by its length.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from pathlib import Path

from vqtool.errors import VqtoolError

# The messages walked, each with the fields that hold another walked message (onnx.proto's field numbers).
_MODEL, _GRAPH, _NODE, _ATTRIBUTE, _TENSOR, _SPARSE, _FUNCTION, _TRAINING = range(8)
_CHILDREN: dict[int, dict[int, int]] = {
    _MODEL: {7: _GRAPH, 20: _TRAINING, 25: _FUNCTION},  # graph, training_info, functions
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},  # node, initializer, sparse_initializer
    _NODE: {5: _ATTRIBUTE},  # attribute
    # attribute: t, g, tensors, graphs, sparse_tensor, sparse_tensors
    _ATTRIBUTE: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
    _SPARSE: {1: _TENSOR, 2: _TENSOR},  # values, indices
    _FUNCTION: {7: _NODE, 11: _ATTRIBUTE},  # node, attribute_proto
    _TRAINING: {1: _GRAPH, 2: _GRAPH},  # initialization, algorithm
    _TENSOR: {},
}
_TENSOR_NAME, _EXTERNAL_DATA, _DATA_LOCATION, _EXTERNAL = 8, 13, 14, 1


class _Malformed(ValueError):
    pass


def _varint(data: mmap.mmap | bytes, at: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if at >= end or shift > 63:
            raise _Malformed("a number runs past its message")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7


def _fields(data: mmap.mmap | bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value or start, end) of each field of the message in data[start:end]."""
    at = start
    while at < end:
        key, at = _varint(data, at, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, at = _varint(data, at, end)
            yield number, wire, value, at
        elif wire == 2:
            length, at = _varint(data, at, end)
            if at + length > end:
                raise _Malformed("a field runs past its message")
            yield number, wire, at, at + length
            at += length
        elif wire in (1, 5):
            at += 8 if wire == 1 else 4
            yield number, wire, 0, at
        else:
            raise _Malformed(f"wire type {wire}")
    if at != end:
        raise _Malformed("a field runs past its message")


def _external_tensors(data: mmap.mmap | bytes) -> list[str]:
    """Names of the tensors whose bytes the graph keeps in another file."""
    found: list[str] = []
    stack = [(_MODEL, 0, len(data))]
    while stack:
        kind, start, end = stack.pop()
        if kind == _TENSOR:
            name, external = "", False
            for number, wire, first, last in _fields(data, start, end):
                if number == _TENSOR_NAME and wire == 2:
                    name = bytes(data[first:last]).decode("utf-8", "replace")
                elif (number == _EXTERNAL_DATA and wire == 2) or (
                    number == _DATA_LOCATION and wire == 0 and first == _EXTERNAL
                ):
                    external = True
            if external:
                found.append(name or "(unnamed)")
            continue
        children = _CHILDREN[kind]
        for number, wire, first, last in _fields(data, start, end):
            if wire == 2 and number in children:
                stack.append((children[number], first, last))
    return found


def check_self_contained(path: Path) -> None:
    """Refuse, in one line, an ONNX graph that keeps tensor data in other files (or cannot be parsed as a graph)."""
    with open(path, "rb") as handle:
        size = handle.seek(0, 2)
        if size == 0:
            raise VqtoolError("is empty, not an ONNX graph", path)
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            try:
                external = _external_tensors(data)
            except _Malformed as exc:
                raise VqtoolError(f"is not a readable ONNX graph ({exc})", path) from None
    if external:
        names = ", ".join(external[:3]) + (f" and {len(external) - 3} more" if len(external) > 3 else "")
        raise VqtoolError(
            f"keeps tensor data in other files ({names}); vqtool runs only self-contained graphs, which read no "
            "file but their own",
            path,
        )

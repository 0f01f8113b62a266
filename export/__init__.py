"""vqtool.export: ONNX export, INT8 quantization, TensorRT builds and parity (installed as vqtool.export)."""

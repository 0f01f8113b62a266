"""vqtool: train a VQ-VAE image tokenizer, export it to ONNX/TensorRT, and run it with verified parity."""

__version__ = "0.1.0"

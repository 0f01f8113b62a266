"""vqtool.train: the PyTorch model, its data and the training loop (installed as vqtool.train)."""

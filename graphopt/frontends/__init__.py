"""Frontends: turn ONNX models and torch.fx graphs into IR graphs."""

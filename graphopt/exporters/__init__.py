"""Exporters: turn IR graphs back into ONNX models and runnable torch.fx GraphModules."""

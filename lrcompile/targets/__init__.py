"""Deployment targets: ONNX file, ONNX Runtime (latency), TensorRT engine."""

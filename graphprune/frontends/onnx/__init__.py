"""The ONNX frontend: ``onnx.ModelProto`` or a path → IR via onnx-graphsurgeon, and back (a pruned
ONNX model checked in onnxruntime)."""

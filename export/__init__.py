"""refvlm_export (folder export/): ONNX export, TensorRT engines, the exported runtimes, parity."""

"""refvlm_export (folder export/): ONNX export, TensorRT engines, runtime backends, parity."""

"""ONNX models: the offline converter call, conversion variants, ONNX Runtime as reference, localisation."""

"""Using a trained run: the merged model, prediction and evaluation, the shift report,
exports (merged folder, ONNX, TorchScript) and their backends, and the HTTP server."""

"""Using a trained run: the merged model, prediction and evaluation, the shift report, exports
(merged folder, ONNX), the backends that score a run folder or an export (and tell the two
apart), and the HTTP server."""

"""Hardware targets as data: measured ones (run the deployed files: cpu, mobile, cuda) and virtual ones
(estimated from the ONNX graph: mcu, npu, dataflow), the graph analysis they share, and the learned
performance predictor (PerfSAGE) trained on graphs measured here."""

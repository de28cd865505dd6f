"""Post-training quantization: simulated integer layers (`quantize_`), calibration, Winograd-domain
quantization; condenser.runtime deploys the result on ONNX Runtime and ExecuTorch."""

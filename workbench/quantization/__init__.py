"""Weight quantization: RTN, GPTQ and AWQ-style scaling, and compressed-tensors exports."""

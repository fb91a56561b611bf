"""fourbit: 4-bit post-training quantization for diffusion models."""
__version__ = "0.1.0"

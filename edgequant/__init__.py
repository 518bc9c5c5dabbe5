"""edgequant: GPTQ straight onto llama.cpp's K-quant grids."""

__version__ = "0.1.0"

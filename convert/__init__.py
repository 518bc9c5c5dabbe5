"""GGUF block codecs, llama.cpp ftype recipes and the GGUF writer (installed as edgequant.convert)."""

"""llama.cpp drivers: run, eval, bench, parity (installed as edgequant.runners)."""

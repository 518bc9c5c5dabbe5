"""GPTQ on llama.cpp's block grids."""

from .solver import Solution, solve

__all__ = ["Solution", "solve"]

"""Mistral (HF format): llama.cpp runs it as LLaMA, sliding window aside (llama.cpp ignores it for Mistral 7B v0.1 too)."""

from dataclasses import replace

from .base import register
from .llama import LLAMA

MISTRAL = register(replace(LLAMA, hf_classes=("MistralForCausalLM",)))

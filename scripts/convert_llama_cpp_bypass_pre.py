"""Run llama.cpp's own converter (convert_hf_to_gguf.py from the llama.cpp tools' sources) on a model whose
retrained byte-level BPE vocabulary it does not recognise, telling it the pre-tokenizer instead (its check
hashes the tokenization of a fixed text, which a retrained vocabulary changes).  For ../shared/models/bench-moe
(Qwen2-style pre-tokenizer) and the like; llama.cpp's code runs unchanged otherwise.

    python scripts/convert_llama_cpp_bypass_pre.py qwen2 MODEL_DIR --outfile OUT.gguf --outtype f32
"""

import runpy
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1] / ".cache" / "llama-tools"


def main() -> None:
    pre, argv = sys.argv[1], sys.argv[2:]
    script = next(TOOLS.glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"), None)
    if script is None:
        sys.exit("llama.cpp's converter not found: run scripts/build_llama_tools.sh")
    sys.path.insert(0, str(script.parent))
    sys.path.insert(0, str(script.parent / "gguf-py"))
    from conversion import base

    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
    sys.argv = [str(script), *argv]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()

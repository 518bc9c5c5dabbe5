"""`edgequant run`: generate text from a GGUF with llama.cpp, streamed to stdout."""

from __future__ import annotations

import argparse
import sys

from edgequant.errors import UserError

DEFAULT_CTX = 4096  # capped at the model's training context


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run", help="generate text from a GGUF (streamed)",
        description="Continue PROMPT with llama.cpp, printing tokens as they come. With --chat the prompt is a "
                    "user message formatted with the GGUF's own chat template.")
    p.add_argument("gguf", metavar="GGUF")
    p.add_argument("-p", "--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="apply the GGUF's chat template (tokenizer.chat_template)")
    p.add_argument("--max-tokens", type=int, default=128, metavar="N", help="tokens to generate (default 128)")
    p.add_argument("--temp", type=float, default=0.8, metavar="T",
                   help="sampling temperature; 0 is greedy (default 0.8)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed (default 0)")
    p.add_argument("--gpu-layers", type=int, default=-1, help="layers to offload when the build supports it "
                                                              "(default -1: all)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all available)")
    p.add_argument("--ctx", type=int, default=None,
                   help=f"context size (default: the training context, at most {DEFAULT_CTX})")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.max_tokens < 1:
        raise UserError("--max-tokens must be >= 1")
    from edgequant.runners import llama

    n_ctx = args.ctx or min(DEFAULT_CTX, llama.context_length(llama.open_gguf_header(args.gguf)) or DEFAULT_CTX)
    with llama.LlamaCppModel(args.gguf, n_ctx=n_ctx, n_batch=512, n_threads=args.threads,
                             n_gpu_layers=args.gpu_layers, seed=args.seed) as model:
        sampling = dict(max_tokens=args.max_tokens, temperature=args.temp, seed=args.seed, stream=True)
        try:
            if args.chat:
                if model.chat_template is None:
                    raise UserError(f"{args.gguf} has no chat template (tokenizer.chat_template); drop --chat")
                messages = [{"role": "user", "content": args.prompt}]
                stream = model.llm.create_chat_completion(messages=messages, **sampling)
                pieces = (c["choices"][0]["delta"].get("content") or "" for c in stream)
            else:
                stream = model.llm.create_completion(args.prompt, **sampling)
                pieces = (c["choices"][0]["text"] for c in stream)
                sys.stdout.write(args.prompt)  # a continuation reads best after its prompt
            for piece in pieces:
                sys.stdout.write(piece)
                sys.stdout.flush()
        except ValueError as e:  # llama-cpp-python's "Requested tokens (...) exceed context window of ..."
            raise UserError(str(e)) from None
    sys.stdout.write("\n")
    return 0

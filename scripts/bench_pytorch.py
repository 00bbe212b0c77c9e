#!/usr/bin/env python3
"""Measure PyTorch training speed with llama2.c's own model.py, for `anetrain bench train`.

Issue 4's speed bar is PyTorch running llama2.c's model.py on the same machine. This script
runs that comparison here, in the same conditions as `anetrain bench train`: fp32, the given
thread count, random tokens, and the training step of llama2.c's train.py (forward with
targets, backward, gradient clipping at 1.0, AdamW, zero_grad).

llama2.c's model.py is not part of this repository (its code stays in its own project); pass
the path of a copy with --model-py. Needs `pip install torch numpy`.

    python3 scripts/bench_pytorch.py --model-py ~/llama2.c/model.py --model stories15m --batch 8
    python3 scripts/bench_pytorch.py --model-py ~/llama2.c/model.py --model stories110m --batch 4 --compile

Prints ms/step and tokens/s (median over the timed steps), one line of JSON with --json.
"""
import argparse
import importlib.util
import json
import statistics
import sys
import time

import torch

PRESETS = {
    # name: (dim, n_layers, n_heads, n_kv_heads, vocab, max_seq_len), as llama2.c's models
    "stories15m": (288, 6, 6, 6, 32000, 256),
    "stories42m": (512, 8, 8, 8, 32000, 1024),
    "stories110m": (768, 12, 12, 12, 32000, 1024),
}


def load_model_module(path):
    spec = importlib.util.spec_from_file_location("llama2c_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-py", required=True, help="path to llama2.c's model.py")
    p.add_argument("--model", default="stories15m", choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(1337)
    m = load_model_module(args.model_py)
    dim, n_layers, n_heads, n_kv_heads, vocab, max_seq = PRESETS[args.model]
    if args.seq > max_seq:
        print(f"--seq {args.seq} is larger than {args.model}'s {max_seq}", file=sys.stderr)
        return 2
    margs = m.ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                        vocab_size=vocab, multiple_of=32, max_seq_len=max_seq, dropout=0.0)
    model = m.Transformer(margs)
    model.train()
    optimizer = model.configure_optimizers(0.1, 5e-4, (0.9, 0.95), "cpu")
    step_model = torch.compile(model) if args.compile else model

    def step():
        x = torch.randint(0, vocab, (args.batch, args.seq))
        y = torch.randint(0, vocab, (args.batch, args.seq))
        step_model(x, y)
        loss = model.last_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    tokens_per_s = args.batch * args.seq / (ms / 1e3)
    result = {"framework": "pytorch", "torch": torch.__version__, "compile": args.compile,
              "model": args.model, "batch": args.batch, "seq": args.seq, "threads": args.threads,
              "ms_per_step": ms, "tokens_per_s": tokens_per_s}
    if args.json:
        print(json.dumps(result))
    else:
        mode = "torch.compile" if args.compile else "eager"
        print(f"pytorch {torch.__version__} {mode}: {args.model} batch {args.batch} seq {args.seq}, "
              f"{args.threads} threads: {ms:.1f} ms/step, {tokens_per_s:.0f} tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

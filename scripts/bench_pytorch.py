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

`--model-py transformers` runs the same step on a `transformers` model made from a config
instead (random weights, no download): the Hugging Face presets (smollm2-135m, qwen2.5-0.5b,
qwen3-0.6b: LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM at their real shapes) and
the stories presets as LlamaForCausalLM. Needs `pip install torch transformers`.

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

# The Hugging Face presets, as `llama::Config::preset` defines them.
HF_PRESETS = {
    "smollm2-135m": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                   max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                                   tie_word_embeddings=True)),
    "qwen2.5-0.5b": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                   max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                                   tie_word_embeddings=True)),
    "qwen3-0.6b": ("qwen3", dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                                 max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6,
                                 tie_word_embeddings=True)),
}


def transformers_model(name):
    """A random transformers model of preset `name`, and its vocabulary size."""
    import transformers

    if name in HF_PRESETS:
        kind, cfg = HF_PRESETS[name]
    else:
        dim, n_layers, n_heads, n_kv_heads, vocab, max_seq = PRESETS[name]
        hidden = 32 * ((8 * dim + 3 * 32 - 1) // (3 * 32))
        kind, cfg = "llama", dict(hidden_size=dim, intermediate_size=hidden, num_hidden_layers=n_layers,
                                  num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, vocab_size=vocab,
                                  max_position_embeddings=max_seq, rms_norm_eps=1e-5, tie_word_embeddings=True)
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[kind]
    model = model_class(config_class(**cfg)).float()
    return model, cfg["vocab_size"], cfg["max_position_embeddings"]


def load_model_module(path):
    spec = importlib.util.spec_from_file_location("llama2c_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-py", required=True,
                   help="path to llama2.c's model.py, or `transformers` for a transformers model")
    p.add_argument("--model", default="stories15m", choices=sorted(PRESETS) + sorted(HF_PRESETS))
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
    hf = args.model_py == "transformers"
    if hf:
        model, vocab, max_seq = transformers_model(args.model)
    else:
        if args.model in HF_PRESETS:
            print(f"--model {args.model} needs --model-py transformers", file=sys.stderr)
            return 2
        m = load_model_module(args.model_py)
        dim, n_layers, n_heads, n_kv_heads, vocab, max_seq = PRESETS[args.model]
        margs = m.ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                            vocab_size=vocab, multiple_of=32, max_seq_len=max_seq, dropout=0.0)
        model = m.Transformer(margs)
    if args.seq > max_seq:
        print(f"--seq {args.seq} is larger than {args.model}'s {max_seq}", file=sys.stderr)
        return 2
    model.train()
    if hf:
        # llama2.c's configure_optimizers: decay on every tensor of 2 or more dimensions.
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=5e-4, betas=(0.9, 0.95))
    else:
        optimizer = model.configure_optimizers(0.1, 5e-4, (0.9, 0.95), "cpu")
    step_model = torch.compile(model) if args.compile else model

    def step():
        x = torch.randint(0, vocab, (args.batch, args.seq))
        y = torch.randint(0, vocab, (args.batch, args.seq))
        if hf:
            logits = step_model(x).logits
            loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        else:
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
    result = {"framework": "transformers" if hf else "pytorch", "torch": torch.__version__, "compile": args.compile,
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

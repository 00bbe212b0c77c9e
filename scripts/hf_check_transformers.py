#!/usr/bin/env python3
"""Check anetrain's Hugging Face interop with the real `transformers` library.

Not part of CI: it needs `pip install torch transformers numpy` (PyPI's Linux torch
wheels pull in CUDA libraries, several GB). The Rust tests check the same properties
without Python: crates/llama/tests/hf.rs runs a forward pass written the way transformers
computes (half-split RoPE, HF tensor names) on the exported tensors, and
crates/cli/tests/interop.rs regenerates llama2.c's greedy text from the exported folder.

Two checks, each exits non-zero when it fails:

1. `export` — a folder written by `anetrain export --to-hf`, from llama2.c's stories260K:

       anetrain export ../shared/fixtures/stories260K.bin --to-hf /tmp/hf   # tok512.bin beside it as tokenizer.bin
       python3 scripts/hf_check_transformers.py export /tmp/hf \\
           --reference ../shared/fixtures/stories260K.greedy-256.txt --model-bin ../shared/fixtures/stories260K.bin

   a. AutoModelForCausalLM and AutoTokenizer load the folder;
   b. greedy decoding from BOS for 256 positions prints exactly llama2.c's `run -t 0`
      output (the reference text file);
   c. with --model-bin: transformers' logits at every position of that text equal the
      logits of an independent float64 NumPy forward pass written as llama2.c's run.c
      computes (interleaved RoPE, the model.bin layout) — so the q/k permutation is right;
   d. the tokenizer round-trips the reference text.

2. `qwen2` — `anetrain generate` on a tiny random Qwen2ForCausalLM that transformers
   itself creates and saves (QKV biases, GQA, tied embeddings, RoPE θ = 1e6):

       python3 scripts/hf_check_transformers.py qwen2 --anetrain target/release/anetrain \\
           --tokenizer /tmp/hf/tokenizer.json

   the token ids of anetrain's greedy continuation (`generate --ids`) equal those of
   transformers' `generate`. `--size 0.5b` does the same at Qwen2.5-0.5B's full shape
   (24 layers, dim 896, 14/2 heads, vocab 151936) with random weights (2 GB of fp32).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


# ---------------------------------------------------------------------------------------
# An independent llama2.c forward pass, in float64 NumPy, from model.bin
# ---------------------------------------------------------------------------------------

def read_llama2c(path):
    """llama2.c's legacy (v0) model.bin: 7 int32 header fields, then the f32 tensors."""
    raw = open(path, "rb").read()
    dim, hidden, layers, heads, kv_heads, vocab, seq = np.frombuffer(raw[:28], dtype=np.int32)
    shared = vocab > 0
    vocab = abs(int(vocab))
    data = np.frombuffer(raw[28:], dtype=np.float32).astype(np.float64)
    hd = dim // heads
    kv = kv_heads * hd
    w, at = {}, 0

    def take(name, *shape):
        nonlocal at
        n = int(np.prod(shape))
        w[name] = data[at:at + n].reshape(shape)
        at += n

    take("emb", vocab, dim)
    take("rms_att", layers, dim)
    take("wq", layers, dim, dim)
    take("wk", layers, kv, dim)
    take("wv", layers, kv, dim)
    take("wo", layers, dim, dim)
    take("rms_ffn", layers, dim)
    take("w1", layers, hidden, dim)
    take("w2", layers, dim, hidden)
    take("w3", layers, hidden, dim)
    take("rms_final", dim)
    at += seq * hd  # freq_cis_real and freq_cis_imag, unused: recomputed below
    w["wcls"] = w["emb"] if shared else data[at:at + vocab * dim].reshape(vocab, dim)
    cfg = dict(dim=int(dim), layers=int(layers), heads=int(heads), kv_heads=int(kv_heads), hd=int(hd))
    return cfg, w


def llama2c_logits(cfg, w, tokens):
    """Logits [T, V] for `tokens`, computed as llama2.c's run.c does, all positions at once."""
    t_len, hd, heads, kvh = len(tokens), cfg["hd"], cfg["heads"], cfg["kv_heads"]

    def rmsnorm(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * g

    # run.c: for each even i, the pair (i, i+1) rotates by pos / 10000^((i % hd) / hd).
    freq = 1.0 / 10000.0 ** (np.arange(0, hd, 2) / hd)
    angle = np.arange(t_len)[:, None] * freq[None, :]
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]

    def rope(x, n):
        x = x.reshape(t_len, n, hd // 2, 2)
        a, b = x[..., 0], x[..., 1]
        return np.stack([a * cos - b * sin, a * sin + b * cos], -1).reshape(t_len, n * hd)

    mask = np.triu(np.full((t_len, t_len), -np.inf), 1)
    x = w["emb"][tokens]
    for l in range(cfg["layers"]):
        xb = rmsnorm(x, w["rms_att"][l])
        q = rope(xb @ w["wq"][l].T, heads).reshape(t_len, heads, hd).transpose(1, 0, 2)
        k = rope(xb @ w["wk"][l].T, kvh).reshape(t_len, kvh, hd).transpose(1, 0, 2)
        v = (xb @ w["wv"][l].T).reshape(t_len, kvh, hd).transpose(1, 0, 2)
        group = heads // kvh  # run.c: query head h reads key/value head h / group
        k, v = np.repeat(k, group, 0), np.repeat(v, group, 0)
        att = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + mask
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = (att @ v).transpose(1, 0, 2).reshape(t_len, heads * hd)
        x = x + o @ w["wo"][l].T
        xb = rmsnorm(x, w["rms_ffn"][l])
        h1, h3 = xb @ w["w1"][l].T, xb @ w["w3"][l].T
        x = x + (h1 / (1.0 + np.exp(-h1)) * h3) @ w["w2"][l].T
    return rmsnorm(x, w["rms_final"]) @ w["wcls"].T


# ---------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------

def load(folder):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    return model


def check_export(args) -> bool:
    reference = open(args.reference, encoding="utf-8").read()
    model = load(args.folder)
    tokenizer = AutoTokenizer.from_pretrained(args.folder)
    ok = True

    ids = torch.tensor([[tokenizer.bos_token_id]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=256, do_sample=False, eos_token_id=None, pad_token_id=0)
    text = tokenizer.decode(out[0], skip_special_tokens=True) + "\n"
    if text != reference:
        print("FAIL greedy text differs from llama2.c's:\n--- transformers\n" + text + "--- llama2.c\n" + reference)
        ok = False
    else:
        print("ok   greedy text matches llama2.c's run byte for byte")

    if args.model_bin:
        tokens = out[0].tolist()
        with torch.no_grad():
            hf = model(torch.tensor([tokens])).logits[0].double().numpy()
        cfg, w = read_llama2c(args.model_bin)
        ref = llama2c_logits(cfg, w, np.array(tokens))
        err = np.abs(hf - ref).max()
        scale = np.abs(ref).max()
        # float32 (transformers) against float64 over 5 layers and 257 positions.
        if err > 1e-4 * max(1.0, scale):
            print(f"FAIL logits differ from the llama2.c-style forward: max |Δ| = {err:.3e} (logits up to {scale:.1f})")
            ok = False
        else:
            print(f"ok   logits at all {len(tokens)} positions match a float64 llama2.c forward: "
                  f"max |Δ| = {err:.2e} (logits up to {scale:.1f})")

    encoded = tokenizer(reference.strip())["input_ids"]
    if tokenizer.decode(encoded, skip_special_tokens=True) != reference.strip():
        print("FAIL tokenizer round trip")
        ok = False
    else:
        print(f"ok   tokenizer round trip ({len(encoded)} tokens)")
    return ok


def check_qwen2(args) -> bool:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from transformers import LogitsProcessor, LogitsProcessorList

    tokenizer_vocab = len(json.load(open(args.tokenizer, encoding="utf-8"))["model"]["vocab"])
    torch.manual_seed(0)
    if args.size == "tiny":
        shape = dict(vocab_size=tokenizer_vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    else:  # Qwen2.5-0.5B's shape, random weights (its real weights are not reachable from here)
        shape = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                     num_attention_heads=14, num_key_value_heads=2, initializer_range=0.05)
    config = Qwen2Config(**shape, max_position_embeddings=256, rope_theta=1e6, rms_norm_eps=1e-6,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    model = Qwen2ForCausalLM(config).eval()

    class TokenizerIdsOnly(LogitsProcessor):
        """anetrain never samples embedding rows past the tokenizer's ids (Qwen2.5 pads its
        vocabulary); do the same here so both pick from the same ids."""

        def __call__(self, input_ids, scores):
            scores[:, tokenizer_vocab:] = -float("inf")
            return scores

    with torch.no_grad():  # non-zero QKV biases, so a dropped bias shows
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.2)
    ok = True
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, safe_serialization=True)
        tok = json.load(open(args.tokenizer, encoding="utf-8"))
        json.dump(tok, open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8"))
        tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(args.tokenizer)))
        prompt = "Once upon a time"
        ids = tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=args.steps, do_sample=False,
                                 eos_token_id=None, pad_token_id=0,
                                 logits_processor=LogitsProcessorList([TokenizerIdsOnly()]))
        want = out[0].tolist()[len(ids):]
        run = subprocess.run(
            [args.anetrain, "generate", "--model", folder, "--prompt", prompt, "--steps", str(args.steps),
             "--temperature", "0", "--device", "cpu", "--ids"],
            capture_output=True, text=True)
        if run.returncode != 0:
            print(f"FAIL anetrain generate exited {run.returncode}:\n{run.stderr}")
            return False
        line = next((l for l in run.stderr.splitlines() if l.startswith("ids: ")), "ids: ")
        got = [int(i) for i in line[len("ids: "):].split()]
        if got != ids + want:
            print(f"FAIL anetrain's greedy ids differ from transformers':\n  anetrain     {got}\n"
                  f"  transformers {ids + want}")
            ok = False
        else:
            print(f"ok   anetrain generate on a random {args.size} Qwen2 model (QKV biases, GQA, tied, θ = 1e6) "
                  f"produces transformers' greedy ids, {len(ids)} prompt + {args.steps} generated")
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="check", required=True)
    e = sub.add_parser("export", help="an `anetrain export --to-hf` folder")
    e.add_argument("folder")
    e.add_argument("--reference", required=True, help="llama2.c's greedy output for the model")
    e.add_argument("--model-bin", help="the llama2.c model.bin the folder was exported from")
    q = sub.add_parser("qwen2", help="`anetrain generate` on a random Qwen2 model")
    q.add_argument("--anetrain", required=True, help="the anetrain binary")
    q.add_argument("--tokenizer", required=True, help="a tokenizer.json (its folder is loaded by AutoTokenizer)")
    q.add_argument("--steps", type=int, default=40)
    q.add_argument("--size", choices=["tiny", "0.5b"], default="tiny",
                   help="0.5b: Qwen2.5-0.5B's shape (24 layers, dim 896, vocab 151936), random weights")
    args = p.parse_args()
    ok = check_export(args) if args.check == "export" else check_qwen2(args)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

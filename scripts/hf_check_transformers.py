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

2. `arch qwen2|qwen3|llama3` — a tiny random Qwen2ForCausalLM (QKV biases), Qwen3ForCausalLM
   (QK-norm, head_dim 32 ≠ hidden 64 / 4 heads) or LlamaForCausalLM with Llama 3's `llama3`
   RoPE scaling, made by transformers itself from a config (no download), GQA throughout:

       python3 scripts/hf_check_transformers.py arch qwen3 --anetrain target/release/anetrain \\
           --tokenizer /tmp/hf/tokenizer.json

   a. `anetrain generate --dump-logits`: the logits at every prompt position within 1e-4
      of their scale of transformers';
   b. `anetrain generate --ids`: the greedy ids equal those of transformers' `generate`;
   c. `anetrain train --init FOLDER` for one step on a one-window shard (the batch is then
      fixed), exported with `export --to-hf`: the loss within 1e-5 relative of a PyTorch
      step on the transformers model, and every updated parameter within 1e-5 relative
      after the same AdamW step (decay on matrices only, as anetrain), except elements
      whose gradient is below fp32 noise, which a first Adam step moves by ±lr whatever
      its sign (counted and printed).
   `--size real` runs a and b at Qwen2.5-0.5B's, Qwen3-0.6B's or Llama 3.2-1B's shape.
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


def make_model(arch, size, tokenizer_vocab):
    """A random transformers model of `arch`, made from a config (no download)."""
    import transformers

    torch.manual_seed(0)
    if size == "tiny":
        shape = dict(vocab_size=tokenizer_vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    elif arch == "qwen2":  # Qwen2.5-0.5B's shape, random weights (its real weights are not reachable here)
        shape = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                     num_attention_heads=14, num_key_value_heads=2, initializer_range=0.05)
    elif arch == "qwen3":  # Qwen3-0.6B's shape
        shape = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                     num_attention_heads=16, num_key_value_heads=8, head_dim=128, initializer_range=0.05)
    else:  # Llama 3.2-1B's shape
        shape = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, initializer_range=0.02)
    common = dict(max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    if arch == "qwen2":
        config = transformers.Qwen2Config(**shape, **common, rope_theta=1e6, rms_norm_eps=1e-6,
                                          tie_word_embeddings=True)
        model = transformers.Qwen2ForCausalLM(config)
    elif arch == "qwen3":
        if size == "tiny":
            shape["head_dim"] = 32  # q_dim 128 ≠ hidden 64, as Qwen3-0.6B's 2048 ≠ 1024
        config = transformers.Qwen3Config(**shape, **common, rope_theta=1e6, rms_norm_eps=1e-6,
                                          tie_word_embeddings=True)
        model = transformers.Qwen3ForCausalLM(config)
    else:
        # Llama 3.2's rope scaling; an original context of 64 puts all three frequency
        # regimes inside the tiny model's head width.
        scaling = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=64 if size == "tiny" else 8192)
        config = transformers.LlamaConfig(**shape, **common, rope_theta=500000.0, rms_norm_eps=1e-5,
                                          tie_word_embeddings=False, rope_scaling=scaling)
        model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # non-zero biases and norm gains away from 1, so a dropped one shows
        for layer in model.model.layers:
            attn = layer.self_attn
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                if proj.bias is not None:
                    proj.bias.normal_(0.0, 0.2)
            for norm in (getattr(attn, "q_norm", None), getattr(attn, "k_norm", None),
                         layer.input_layernorm, layer.post_attention_layernorm):
                if norm is not None:
                    norm.weight.normal_(1.0, 0.2)
    return model.float().eval()


FEATURES = {
    "qwen2": "QKV biases, GQA, tied, θ = 1e6",
    "qwen3": "QK-norm, head_dim apart from hidden/heads, GQA, tied, θ = 1e6",
    "llama3": "llama3 RoPE scaling, GQA, untied, θ = 5e5",
}


def check_arch(args) -> bool:
    """`anetrain generate` (greedy ids, logits) and `anetrain train` (one AdamW step) on
    a random model of args.arch against transformers and PyTorch."""
    from safetensors.torch import load_file
    from transformers import LogitsProcessor, LogitsProcessorList

    tokenizer_vocab = len(json.load(open(args.tokenizer, encoding="utf-8"))["model"]["vocab"])
    model = make_model(args.arch, args.size, tokenizer_vocab)

    class TokenizerIdsOnly(LogitsProcessor):
        """anetrain never samples embedding rows past the tokenizer's ids (Qwen2.5 pads its
        vocabulary); do the same here so both pick from the same ids."""

        def __call__(self, input_ids, scores):
            scores[:, tokenizer_vocab:] = -float("inf")
            return scores

    what = f"a random {args.size} {args.arch} model ({FEATURES[args.arch]})"
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "model")
        model.save_pretrained(folder, safe_serialization=True)
        tok = json.load(open(args.tokenizer, encoding="utf-8"))
        json.dump(tok, open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8"))
        tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(args.tokenizer)))
        prompt = "Once upon a time, there was a little girl named Lily"
        ids = tokenizer(prompt)["input_ids"]

        # 1. Logits at every prompt position, within 1e-4 relative to their scale.
        dump = os.path.join(tmp, "logits.npy")
        run = subprocess.run([args.anetrain, "generate", "--model", folder, "--prompt", prompt, "--device", "cpu",
                              "--dump-logits", dump], capture_output=True, text=True)
        if run.returncode != 0:
            print(f"FAIL anetrain generate --dump-logits exited {run.returncode}:\n{run.stderr}")
            return False
        ours = np.load(dump).astype(np.float64)
        with torch.no_grad():
            theirs = model(torch.tensor([ids])).logits[0].double().numpy()
        rel = np.abs(ours - theirs).max() / np.abs(theirs).max()
        if not rel <= 1e-4:
            print(f"FAIL logits of {what}: max |Δ| / max |logit| = {rel:.2e} (bar 1e-4)")
            ok = False
        else:
            print(f"ok   logits of {what} at {len(ids)} positions: max |Δ| / max |logit| = {rel:.2e}")

        # 2. Greedy ids.
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
            print(f"ok   anetrain generate on {what} produces transformers' greedy ids, "
                  f"{len(ids)} prompt + {args.steps} generated")

        if args.size != "tiny":
            return ok
        # 3. One training step from the same weights and batch: the loss and every updated
        # parameter against a PyTorch AdamW step on the transformers model. The shard holds
        # exactly seq + 1 tokens, so the one window anetrain can draw is the batch.
        seq = 32
        gen = np.random.default_rng(7)
        tokens = gen.integers(3, tokenizer_vocab, size=seq + 1).astype(np.uint16)
        shard = os.path.join(tmp, "batch.bin")
        tokens.tofile(shard)
        lr, wd, b1, b2, eps = 1e-3, 0.1, 0.9, 0.95, 1e-8
        ckpt = os.path.join(tmp, "run", "ckpt.bin")
        telemetry = os.path.join(tmp, "telemetry.jsonl")
        run = subprocess.run(
            [args.anetrain, "train", "--init", folder, "--data", shard, "--val-data", shard, "--steps", "1",
             "--batch", "1", "--seq", str(seq), "--lr", str(lr), "--min-lr", str(lr), "--warmup", "0",
             "--clip", "0", "--weight-decay", str(wd), "--beta1", str(b1), "--beta2", str(b2), "--eps", str(eps),
             "--device", "cpu", "--precision", "fp32", "--pipeline", "dynamic", "--ckpt", ckpt,
             "--sample-steps", "0", "--eval-every", "1000", "--quiet", "--telemetry", telemetry],
            capture_output=True, text=True)
        if run.returncode != 0:
            print(f"FAIL anetrain train exited {run.returncode}:\n{run.stderr}")
            return False
        steps = [json.loads(l) for l in open(telemetry) if '"event":"step"' in l]
        our_loss = steps[0]["loss"]
        exported = os.path.join(tmp, "trained")
        run = subprocess.run([args.anetrain, "export", ckpt, "--to-hf", exported], capture_output=True, text=True)
        if run.returncode != 0:
            print(f"FAIL anetrain export --to-hf exited {run.returncode}:\n{run.stderr}")
            return False
        ours = load_file(os.path.join(exported, "model.safetensors"))

        model.train()
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=lr, betas=(b1, b2), eps=eps)
        inputs = torch.tensor(tokens[:-1].astype(np.int64))[None]
        targets = torch.tensor(tokens[1:].astype(np.int64))
        logits = model(inputs).logits[0]
        loss = torch.nn.functional.cross_entropy(logits.float(), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        rel_loss = abs(our_loss - loss.item()) / abs(loss.item())
        if not rel_loss <= 1e-5:
            print(f"FAIL training loss: anetrain {our_loss}, PyTorch {loss.item()} (relative {rel_loss:.2e})")
            ok = False
        else:
            print(f"ok   one training step's loss: anetrain {our_loss:.7f}, PyTorch {loss.item():.7f} "
                  f"(relative {rel_loss:.1e})")
        # A first Adam step moves each element by about lr · sign(gradient): where the
        # gradient is below fp32 noise (|g| < 1e-3 · the tensor's RMS gradient; it sums
        # terms 1000× larger) the two implementations may round it to opposite signs, and
        # that element moves by ±lr either way. Those are excused, and counted.
        grads = {n: p.grad.detach().double() for n, p in model.named_parameters()}
        worst, worst_name, excused, total = 0.0, "", 0, 0
        state = {k: v for k, v in model.state_dict().items() if not k.endswith("inv_freq")}
        for name, value in state.items():
            if name == "lm_head.weight" and name not in ours:
                continue  # tied
            got = ours[name].double()
            want = value.detach().double()
            g = grads[name]
            noise = g.abs() < 1e-3 * g.pow(2).mean().sqrt()
            # Relative to each element, floored at the learning rate (an element at 0
            # moves by about lr in a first Adam step).
            rel = (got - want).abs() / want.abs().clamp(min=lr)
            excused += int((noise & (rel > 1e-5)).sum())
            total += rel.numel()
            rel = rel[~noise]
            if rel.numel() and rel.max().item() > worst:
                worst, worst_name = rel.max().item(), name
        if not worst <= 1e-5:
            print(f"FAIL updated parameters: worst relative difference {worst:.2e} in {worst_name} (bar 1e-5)")
            ok = False
        else:
            print(f"ok   one AdamW step: {total - excused} of {total} updated parameters within {worst:.1e} relative "
                  f"of PyTorch's; {excused} with a gradient below fp32 noise moved by ±lr")
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="check", required=True)
    e = sub.add_parser("export", help="an `anetrain export --to-hf` folder")
    e.add_argument("folder")
    e.add_argument("--reference", required=True, help="llama2.c's greedy output for the model")
    e.add_argument("--model-bin", help="the llama2.c model.bin the folder was exported from")
    q = sub.add_parser("arch", help="generate and one training step on a random Qwen2/Qwen3/Llama 3 model")
    q.add_argument("arch", choices=["qwen2", "qwen3", "llama3"])
    q.add_argument("--anetrain", required=True, help="the anetrain binary")
    q.add_argument("--tokenizer", required=True, help="a tokenizer.json (its folder is loaded by AutoTokenizer)")
    q.add_argument("--steps", type=int, default=40)
    q.add_argument("--size", choices=["tiny", "real"], default="tiny",
                   help="real: Qwen2.5-0.5B's, Qwen3-0.6B's or Llama 3.2-1B's shape, random weights "
                        "(generation and logits only)")
    args = p.parse_args()
    ok = check_export(args) if args.check == "export" else check_arch(args)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

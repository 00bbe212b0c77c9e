#!/usr/bin/env python3
"""Check anetrain's LoRA adapters against Hugging Face `peft`.

Not part of CI: it needs `pip install torch transformers peft numpy`. The Rust tests
check the same properties without Python (crates/train/tests/lora.rs: gradients against
the merged model's chain rule and finite differences; crates/train/src/peft.rs: the
folder round trip and the RoPE row order).

    python3 scripts/peft_check.py --anetrain target/release/anetrain [--arch llama qwen2]

For each architecture, in a temporary folder:
1. `transformers` makes a small random model from a config (no download) whose weights
   are fp16 numbers (anetrain's LoRA kernels bake the base in fp16), and saves it.
2. PEFT makes an adapter on every projection (q,k,v,o,gate,up,down) with a non-zero B
   (so both A and B get gradients) and saves it: the common starting point.
3. anetrain trains one step from it (`train --init-lora`) on one fixed window of tokens
   (a data shard holding exactly one window), exports the adapter; PEFT takes the same
   step with torch.optim.AdamW (same lr, betas, eps, weight decay, no clipping).
   The updated A and B must agree to 1e-5 relative (of each tensor's largest value).
4. anetrain trains 20 steps (fresh PEFT-initialised adapters, every projection) on that
   window and exports the adapter; PEFT loads
   it (`PeftModel.from_pretrained`) on the base: its logits must agree to 1e-4 relative
   with those of anetrain's merged model (`export --merge-lora --to-hf`), and its loss on
   the validation window with the validation loss anetrain reports in its telemetry.
Exits non-zero on the first failure.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA, SEQ, VOCAB = 8, 16, 32, 512
LR, BETAS, EPS, WD = 1e-3, (0.9, 0.95), 1e-8, 0.1


def make_base(arch, folder):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  rms_norm_eps=1e-5, tie_word_embeddings=False)
    cfg = LlamaConfig(rope_theta=10000.0, **common) if arch == "llama" else Qwen2Config(rope_theta=1e6, **common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).float()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)  # larger than the default init, so the adapters matter
            p.copy_(p.half().float())
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def run(anetrain, *args):
    cmd = [anetrain, *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"FAIL: {' '.join(cmd)}\n{r.stderr}")
    return r


def peft_config():
    return LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")


def rel_close(name, got, want, tol):
    scale = float(np.abs(want).max())
    err = float(np.abs(got - want).max())
    ok = err <= tol * scale
    print(f"  {'ok ' if ok else 'BAD'} {name}: max |diff| {err:.3e}, largest {scale:.3e} (tol {tol:g} relative)")
    return ok


def load_base(folder):
    return AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)


def check(arch, anetrain, work):
    print(f"== {arch}")
    base_dir = os.path.join(work, "base")
    make_base(arch, base_dir)
    ok = True

    # 2. The common starting adapter (B non-zero).
    torch.manual_seed(1)
    start = get_peft_model(load_base(base_dir), peft_config())
    with torch.no_grad():
        for name, p in start.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    start_dir = os.path.join(work, "start")
    start.save_pretrained(start_dir)

    # 3. One step on one fixed window, both ways.
    rng = np.random.default_rng(2)
    window = rng.integers(3, VOCAB, SEQ + 1).astype(np.uint16)
    shard = os.path.join(work, "one.bin")
    window.tofile(shard)
    ckpt1 = os.path.join(work, "one", "ckpt.bin")
    run(anetrain, "train", "--model", base_dir, "--init-lora", start_dir, "--data", shard, "--val-data", shard,
        "--steps", 1, "--batch", 1, "--seq", SEQ, "--lr", LR,
        "--min-lr", LR, "--warmup", 0, "--clip", 0, "--weight-decay", WD, "--beta1", BETAS[0], "--beta2", BETAS[1],
        "--eps", EPS, "--eval-every", 0, "--sample-steps", 0, "--quiet", "--device", "cpu", "--ckpt", ckpt1)
    one_dir = os.path.join(work, "one_adapter")
    run(anetrain, "export", ckpt1, "--lora-adapter", one_dir)
    model = PeftModel.from_pretrained(load_base(base_dir), start_dir, is_trainable=True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    ids = torch.tensor(window.astype(np.int64))[None]
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    got = load_file(os.path.join(one_dir, "adapter_model.safetensors"))
    grads = {n: p.grad.numpy() for n, p in model.named_parameters() if p.requires_grad}
    want = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    # Adam's first step moves a value by lr·g/(|g| + eps): for |g| near eps it turns an
    # f32 rounding difference of the gradient (summation order) into a visible one.
    # Those values (|g| < 100·eps, counted and shown) can only be held to the 2·lr that
    # the first step allows; every other value to 1e-5 relative.
    tiny_total = 0
    for key, value in sorted(want.items()):
        short = key.replace(".default", "")
        if short not in got:
            print(f"  BAD anetrain's adapter has no {short}")
            ok = False
            continue
        g = grads[key]
        tiny = np.abs(g) < 100 * EPS
        tiny_total += int(tiny.sum())
        a, w = got[short].numpy(), value.detach().numpy()
        ok &= rel_close(f"after one step: {short.split('layers.')[1]}", np.where(tiny, w, a), w, 1e-5)
        if tiny.any():
            worst = float(np.abs(a - w)[tiny].max())
            print(f"      {int(tiny.sum())} values with |g| < 100·eps differ by up to {worst:.2e} (lr {LR:g})")
            ok &= worst <= 2 * LR
    print(f"  {tiny_total} adapter values had a gradient below 100·eps")

    # 4. 20 steps from fresh adapters; PEFT loads the adapter.
    ckpt = os.path.join(work, "run", "ckpt.bin")
    telemetry = os.path.join(work, "run", "t.jsonl")
    run(anetrain, "train", "--model", base_dir, "--lora", RANK, "--lora-alpha", ALPHA, "--lora-targets", "all",
        "--steps", 20, "--batch", 4, "--seq", SEQ, "--lr", 1e-2, "--warmup", 2, "--eval-every", 20,
        "--eval-batches", 1, "--sample-steps", 0, "--quiet", "--device", "cpu", "--ckpt", ckpt,
        "--data", shard, "--val-data", shard, "--telemetry", telemetry)
    adapter = os.path.join(work, "adapter")
    run(anetrain, "export", ckpt, "--lora-adapter", adapter)
    merged_dir = os.path.join(work, "merged")
    run(anetrain, "export", ckpt, "--merge-lora", "--to-hf", merged_dir)
    peft_model = PeftModel.from_pretrained(load_base(base_dir), adapter).eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, torch_dtype=torch.float32).eval()
    tokens = torch.tensor(rng.integers(3, VOCAB, (2, SEQ)).astype(np.int64))
    with torch.no_grad():
        lp = peft_model(input_ids=tokens).logits.numpy()
        lm = merged(input_ids=tokens).logits.numpy()
        lb = load_base(base_dir)(input_ids=tokens).logits.numpy()
    moved = float(np.abs(lp - lb).max())
    print(f"  the adapter moves the logits by up to {moved:.3e}")
    ok &= moved > 1e-3
    ok &= rel_close("logits: PEFT (unmerged) vs anetrain's merged model", lp, lm, 1e-4)
    evals = [json.loads(line) for line in open(telemetry) if '"eval"' in line]
    val = [e for e in evals if e.get("event") == "eval" or "val_loss" in e][-1]["val_loss"]
    with torch.no_grad():
        peft_loss = peft_model(input_ids=ids, labels=ids).loss.item()
    ok &= rel_close("validation loss: anetrain's vs PEFT's", np.array([val]), np.array([peft_loss]), 1e-4)
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--anetrain", default="target/release/anetrain")
    ap.add_argument("--arch", nargs="+", default=["llama", "qwen2"], choices=["llama", "qwen2"])
    args = ap.parse_args()
    ok = True
    for arch in args.arch:
        with tempfile.TemporaryDirectory() as work:
            ok &= check(arch, args.anetrain, work)
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Check an `anetrain export --to-hf` folder with Hugging Face transformers.

Not part of CI: it needs `pip install torch transformers` (PyPI's Linux torch wheels pull
in CUDA libraries, several GB). The Rust tests check the same properties without Python:
crates/llama/tests/hf.rs runs a forward pass written the way transformers computes
(half-split RoPE, HF tensor names) on the exported tensors, and
crates/cli/tests/interop.rs regenerates llama2.c's greedy text from the exported folder.

What this script checks, for the folder of llama2.c's stories260K:

    anetrain export ../shared/fixtures/stories260K.bin --to-hf /tmp/hf   # tok512.bin beside it as tokenizer.bin
    python3 scripts/hf_check_transformers.py /tmp/hf ../shared/fixtures/stories260K.greedy-256.txt

1. AutoModelForCausalLM and AutoTokenizer load the folder;
2. greedy decoding from BOS for 256 positions prints exactly llama2.c's `run -t 0` output
   (the reference text file), which only happens if the logits agree with llama2.c's;
3. the tokenizer round-trips the reference text.
Exit status 0 when all hold.
"""
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> int:
    folder, reference_path = sys.argv[1], sys.argv[2]
    reference = open(reference_path, encoding="utf-8").read()
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)

    ids = torch.tensor([[tokenizer.bos_token_id]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=256, do_sample=False, eos_token_id=None, pad_token_id=0)
    text = tokenizer.decode(out[0], skip_special_tokens=True) + "\n"
    ok = True
    if text != reference:
        print("greedy text differs from llama2.c's:\n--- transformers\n" + text + "--- llama2.c\n" + reference)
        ok = False
    else:
        print("greedy text matches llama2.c's run byte for byte")

    encoded = tokenizer(reference.strip())["input_ids"]
    if tokenizer.decode(encoded, skip_special_tokens=True) != reference.strip():
        print("tokenizer round trip failed")
        ok = False
    else:
        print(f"tokenizer round trip ok ({len(encoded)} tokens)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

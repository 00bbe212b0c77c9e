#!/usr/bin/env python3
"""Makes the chat fixture the `chat_data` tests compare against: a tiny byte-level BPE
tokenizer (Qwen-style special tokens), a ChatML template with `{% generation %}` tags,
some conversations, and what Hugging Face transformers renders and masks for them with
`apply_chat_template(..., return_dict=True, return_assistant_tokens_mask=True)`.

Run from this folder: python3 make_fixture.py (needs `transformers` and `tokenizers`;
written with transformers 5.25, tokenizers 0.23). It rewrites tokenizer.json,
tokenizer_config.json, conversations.jsonl and expected.json.
"""
import json

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Qwen2-style ChatML with a default system message; the assistant's reply and its
# end-of-turn are inside {% generation %} tags.
TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>\\n' }}{% endgeneration %}"
    "{%- else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Two plus two is four."}],
    [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Colour of the sky?"},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "And grass?"},
        {"role": "assistant", "content": "Green."},
    ],
    [
        {"role": "user", "content": "Say something in French, with an emoji."},
        {"role": "assistant", "content": "Très bien, merci ! 🌞"},
        {"role": "user", "content": "Thanks"},
    ],
    [{"role": "user", "content": "  spaces   around  "}, {"role": "assistant", "content": "\n\nnewlines\n"}],
]

CORPUS = [
    "Once upon a time there was a helpful assistant who answered questions.",
    "What is two plus two? Two plus two is four. The sky is blue and grass is green.",
    "You are a helpful assistant. Say something in French: très bien, merci.",
    "user assistant system colour of the sky and grass, thanks, newlines and spaces",
] * 20


def main():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.save("tokenizer.json")

    config = {
        "chat_template": TEMPLATE,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 512,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    with open("tokenizer_config.json", "w") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")

    hf = PreTrainedTokenizerFast(tokenizer_file="tokenizer.json", eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf.chat_template = TEMPLATE
    with open("conversations.jsonl", "w") as f:
        for messages in CONVERSATIONS:
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")

    expected = []
    for messages in CONVERSATIONS:
        text = hf.apply_chat_template(messages, tokenize=False)
        out = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids = list(out["input_ids"])
        mask = list(out["assistant_masks"])
        assert len(ids) == len(mask)
        expected.append({"text": text, "input_ids": ids, "assistant_masks": mask})
    with open("expected.json", "w") as f:
        json.dump(expected, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()

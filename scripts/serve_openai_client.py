#!/usr/bin/env python3
"""Drives `anetrain serve` with the official `openai` Python client, as a user's program
would: completions and chat, streamed and not, and checks that the streamed chunks
concatenate to the same text as the non-streamed reply (greedy).

    anetrain serve --model ../shared/fixtures/stories260K.bin --tokenizer ../shared/fixtures/tok512.bin --port 8080 &
    pip install openai
    python3 scripts/serve_openai_client.py --base-url http://127.0.0.1:8080/v1 \
        [--expect ../shared/fixtures/stories260K.greedy-256.txt]

With --expect, the greedy completion of the empty prompt (256 tokens) must equal that
file (llama2.c's text, less its final newline). Not in CI: it needs PyPI.
"""
import argparse
import sys

from openai import OpenAI


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    ap.add_argument("--expect", help="llama2.c's greedy text for the empty prompt")
    args = ap.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="unused")
    model = client.models.list().data[0].id
    print(f"model: {model}")

    whole = client.completions.create(model=model, prompt="", max_tokens=256, temperature=0)
    text = whole.choices[0].text
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model=model, prompt="", max_tokens=256, temperature=0, stream=True)
        if c.choices
    )
    print(f"completion: {len(text)} chars, usage {whole.usage}")
    if streamed != text:
        sys.exit("FAIL: the streamed completion differs from the non-streamed one")
    if args.expect:
        want = open(args.expect, encoding="utf-8").read().removesuffix("\n")
        if text != want:
            sys.exit("FAIL: the greedy completion is not llama2.c's text")
        print("completion equals llama2.c's greedy text (streamed and not)")

    messages = [{"role": "system", "content": "Tell a story."}, {"role": "user", "content": "A cat and a dog."}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=60, temperature=0)
    reply = chat.choices[0].message.content
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=60, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    parts, usage = [], None
    for c in stream:
        if c.choices and c.choices[0].delta.content:
            parts.append(c.choices[0].delta.content)
        if c.usage:
            usage = c.usage
    print(f"chat: {reply!r}\n  usage {chat.usage}, streamed usage {usage}")
    if "".join(parts) != reply:
        sys.exit("FAIL: the streamed chat reply differs from the non-streamed one")
    try:
        client.completions.create(model=model, prompt="x", temperature=-1)
        sys.exit("FAIL: a negative temperature was accepted")
    except Exception as e:  # openai.BadRequestError
        print(f"bad request refused as expected: {type(e).__name__}: {e}")
    print("OK")


if __name__ == "__main__":
    main()

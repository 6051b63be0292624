#!/usr/bin/env python3
"""Greedy-generation references for `truesize infer --reference`, made by HF transformers.

For every fixture folder given (default: tests/fixtures/tiny-*), loads the checkpoint in f32
with eager attention, takes a fixed prompt (the first row of the fixture's
`expected.safetensors` input_ids, first PROMPT tokens, or a seeded random prompt when there is
none), and writes `greedy.json` beside it:

    {"prompt_ids": [...], "generated_ids": [...], "max_new_tokens": N,
     "transformers": "5.24.0", "torch": "...", "model_type": "llama"}

`generated_ids` come from `model.generate(do_sample=False, max_new_tokens=N)` with EOS disabled
(truesize generates exactly N tokens); a plain loop of full forwards (argmax of the last
position) must give the same ids, or the script fails.

With --make-mistral-swa DIR it first creates a tiny Mistral whose sliding window (5) is shorter
than prompt + generation, with the same recipe as the other fixtures (N(0, 0.08) matrices). It
lives under tests/fixtures/infer/: it has no training reference (the training networks do not
implement sliding windows), so the tests that walk every top-level fixture skip it.

Run from the repository root with a Python that has torch, transformers and safetensors
(outside the project: CI never runs this):

    /work/venv/bin/python scripts/make_greedy_refs.py --make-mistral-swa tests/fixtures/infer/tiny-mistral-swa
"""

import argparse
import glob
import json
import os
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM

PROMPT = 8
NEW_TOKENS = 16
INIT_STD = 0.08


def make_mistral_swa(path):
    cfg = transformers.MistralConfig(
        vocab_size=83,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        sliding_window=5,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, INIT_STD)
            elif name.endswith("norm.weight"):
                p.normal_(1.0, 0.1)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    print(f"{path}: tiny Mistral, sliding window {cfg.sliding_window}", file=sys.stderr)


def prompt_for(path, vocab):
    exp = os.path.join(path, "expected.safetensors")
    if os.path.exists(exp):
        from safetensors import safe_open

        with safe_open(exp, "pt") as f:
            return [int(i) for i in f.get_tensor("input_ids")[0][:PROMPT]]
    g = torch.Generator().manual_seed(7)
    return [int(i) for i in torch.randint(0, vocab, (PROMPT,), generator=g)]


def reference(path):
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    vocab = model.config.vocab_size
    prompt = prompt_for(path, vocab)
    ids = torch.tensor([prompt])
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = model.generate(
            ids,
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            attention_mask=torch.ones_like(ids),
        )
        generated = [int(t) for t in out[0][len(prompt):]]
        # The same without a cache: full forwards, argmax of the last position.
        seq = list(prompt)
        for _ in range(NEW_TOKENS):
            logits = model(torch.tensor([seq]), use_cache=False).logits[0, -1]
            seq.append(int(torch.argmax(logits)))
    loop = seq[len(prompt):]
    if loop != generated:
        sys.exit(f"{path}: generate() {generated} differs from the full-forward loop {loop}")
    ref = {
        "prompt_ids": prompt,
        "generated_ids": generated,
        "max_new_tokens": NEW_TOKENS,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "model_type": model.config.model_type,
    }
    with open(os.path.join(path, "greedy.json"), "w") as f:
        json.dump(ref, f, indent=1)
        f.write("\n")
    print(f"{path}: {prompt} -> {generated}", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="*")
    ap.add_argument("--make-mistral-swa", metavar="DIR")
    a = ap.parse_args()
    if a.make_mistral_swa:
        make_mistral_swa(a.make_mistral_swa)
    dirs = a.dirs or sorted(d for d in glob.glob("tests/fixtures/tiny-*") if os.path.isdir(d))
    if a.make_mistral_swa and a.make_mistral_swa not in dirs:
        dirs.append(a.make_mistral_swa)
    for d in dirs:
        reference(d)


if __name__ == "__main__":
    main()

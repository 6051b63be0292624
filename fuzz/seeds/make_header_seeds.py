#!/usr/bin/env python3
"""Writes fuzz/seeds/safetensors_header/: small valid checkpoints of the fuzz target's tiny GPT-2
(d = 4, 2 heads, 1 layer, vocab 8, 8 positions) in a few layouts, and the headers of the test
fixtures (prefix + JSON only, so their data sections are truncated). Run from the repo root."""
import json, os, struct

OUT = "fuzz/seeds/safetensors_header"
D, V, T, FF = 4, 8, 8, 16
SHAPES = {
    "transformer.wte.weight": [V, D],
    "transformer.wpe.weight": [T, D],
    "transformer.h.0.ln_1.weight": [D], "transformer.h.0.ln_1.bias": [D],
    "transformer.h.0.attn.c_attn.weight": [D, 3 * D], "transformer.h.0.attn.c_attn.bias": [3 * D],
    "transformer.h.0.attn.c_proj.weight": [D, D], "transformer.h.0.attn.c_proj.bias": [D],
    "transformer.h.0.ln_2.weight": [D], "transformer.h.0.ln_2.bias": [D],
    "transformer.h.0.mlp.c_fc.weight": [D, FF], "transformer.h.0.mlp.c_fc.bias": [FF],
    "transformer.h.0.mlp.c_proj.weight": [FF, D], "transformer.h.0.mlp.c_proj.bias": [D],
    "transformer.ln_f.weight": [D], "transformer.ln_f.bias": [D],
}
BYTES = {"F32": 4, "F16": 2, "BF16": 2}

def numel(s):
    n = 1
    for d in s:
        n *= d
    return n

def write(name, shapes, dtype="F32", metadata=True):
    header, off = {}, 0
    if metadata:
        header["__metadata__"] = {"format": "pt"}
    for k, s in shapes.items():
        n = numel(s) * BYTES[dtype]
        header[k] = {"dtype": dtype, "shape": s, "data_offsets": [off, off + n]}
        off += n
    j = json.dumps(header, separators=(",", ":")).encode()
    j += b" " * (-len(j) % 8)
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(struct.pack("<Q", len(j)) + j + bytes(off))

os.makedirs(OUT, exist_ok=True)
write("tiny-gpt2-f32.safetensors", SHAPES)
write("tiny-gpt2-bf16.safetensors", SHAPES, "BF16", metadata=False)
bare = {k.removeprefix("transformer."): s for k, s in SHAPES.items()}
bare["h.0.attn.bias"] = [1, 1, T, T]  # the causal-mask buffer old transformers saved
write("tiny-gpt2-bare-names.safetensors", bare, "F16")
write("tiny-gpt2-tied-head-stored.safetensors", {**SHAPES, "lm_head.weight": [V, D]})
missing = dict(SHAPES)
del missing["transformer.ln_f.bias"]
missing["transformer.h.0.mlp.c_fc.weight"] = [FF, D]
write("tiny-gpt2-missing-misshaped.safetensors", missing)
write("empty.safetensors", {}, metadata=False)
for fx in sorted(os.listdir("tests/fixtures")):
    p = os.path.join("tests/fixtures", fx, "model.safetensors")
    if os.path.isfile(p):
        b = open(p, "rb").read()
        n = struct.unpack("<Q", b[:8])[0]
        open(os.path.join(OUT, f"{fx}-header-only.safetensors"), "wb").write(b[: 8 + n])

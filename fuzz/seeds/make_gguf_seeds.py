#!/usr/bin/env python3
"""Writes fuzz/seeds/gguf_header/: tiny valid GGUF files (gguf package, llama.cpp's names) of a
1-layer Llama (d 32, 2 heads, 1 kv head, ff 32, vocab 8), a Mixtral-style MoE and a GPT-2, in
F32 and Q8_0, plus one cut after its header. Small enough (a few KiB) for libFuzzer's 64 KiB
max_len. Run from the repo root with /work/venv/bin/python."""
import os

import gguf
import numpy as np

OUT = "fuzz/seeds/gguf_header"
D, V, FF, T = 32, 8, 32, 16
rng = np.random.default_rng(0)


def r(*shape):
    return rng.normal(0, 0.1, shape).astype(np.float32)


def write(name, arch, tensors, meta, qtype=None, cut=None):
    path = os.path.join(OUT, name)
    w = gguf.GGUFWriter(path, arch)
    meta(w)
    w.add_tokenizer_model("llama" if arch == "llama" else "gpt2")
    w.add_token_list([f"<t{i}>" for i in range(V)])
    for n, t in tensors:
        if qtype is not None and t.ndim >= 2 and not n.endswith("_norm.weight") and "gate_inp" not in n and "position" not in n:
            w.add_tensor(n, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(n, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if cut:
        data = open(path, "rb").read()
        open(path, "wb").write(data[:cut])


def llama_meta(experts=0):
    def m(w):
        w.add_context_length(T)
        w.add_embedding_length(D)
        w.add_feed_forward_length(FF)
        w.add_block_count(1)
        w.add_head_count(2)
        w.add_head_count_kv(1)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_rope_freq_base(10000.0)
        if experts:
            w.add_expert_count(experts)
            w.add_expert_used_count(2)
    return m


def llama(experts=0):
    t = [("token_embd.weight", r(V, D)), ("output_norm.weight", r(D)), ("output.weight", r(V, D)),
         ("blk.0.attn_norm.weight", r(D)), ("blk.0.ffn_norm.weight", r(D)),
         ("blk.0.attn_q.weight", r(D, D)), ("blk.0.attn_k.weight", r(16, D)),
         ("blk.0.attn_v.weight", r(16, D)), ("blk.0.attn_output.weight", r(D, D))]
    if experts:
        t += [("blk.0.ffn_gate_inp.weight", r(experts, D)),
              ("blk.0.ffn_gate_exps.weight", r(experts, FF, D)),
              ("blk.0.ffn_up_exps.weight", r(experts, FF, D)),
              ("blk.0.ffn_down_exps.weight", r(experts, D, FF))]
    else:
        t += [("blk.0.ffn_gate.weight", r(FF, D)), ("blk.0.ffn_up.weight", r(FF, D)),
              ("blk.0.ffn_down.weight", r(D, FF))]
    return t


def gpt2_meta(w):
    w.add_context_length(T)
    w.add_embedding_length(D)
    w.add_feed_forward_length(4 * D)
    w.add_block_count(1)
    w.add_head_count(2)
    w.add_layer_norm_eps(1e-5)


def gpt2():
    t = [("token_embd.weight", r(V, D)), ("position_embd.weight", r(T, D)),
         ("output_norm.weight", r(D)), ("output_norm.bias", r(D)), ("output.weight", r(V, D))]
    for n, s in [("attn_norm", [D]), ("ffn_norm", [D])]:
        t += [(f"blk.0.{n}.weight", r(*s)), (f"blk.0.{n}.bias", r(*s))]
    for n, o, i in [("attn_qkv", 3 * D, D), ("attn_output", D, D), ("ffn_up", 4 * D, D), ("ffn_down", D, 4 * D)]:
        t += [(f"blk.0.{n}.weight", r(o, i)), (f"blk.0.{n}.bias", r(o))]
    return t


def main():
    os.makedirs(OUT, exist_ok=True)
    write("llama-f32.gguf", "llama", llama(), llama_meta())
    write("llama-q8_0.gguf", "llama", llama(), llama_meta(), gguf.GGMLQuantizationType.Q8_0)
    write("llama-q4_0.gguf", "llama", llama(), llama_meta(), gguf.GGMLQuantizationType.Q4_0)
    write("mixtral-q8_0.gguf", "llama", llama(4), llama_meta(4), gguf.GGMLQuantizationType.Q8_0)
    write("gpt2-f32.gguf", "gpt2", gpt2(), gpt2_meta)
    write("llama-header-only.gguf", "llama", llama(), llama_meta(), cut=1200)


if __name__ == "__main__":
    main()

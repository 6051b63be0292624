#!/usr/bin/env python3
"""GGUF test files from the HF fixtures, written with the `gguf` package (llama.cpp's own
writer and quantizers) the way llama.cpp's `convert_hf_to_gguf.py` writes them:

- names: llama.cpp's (`token_embd`, `blk.N.attn_q`, `ffn_gate_exps`, ...), via gguf's
  TensorNameMap; Mixtral's experts stacked into one [experts, out, in] tensor per projection;
- Llama-architecture q/k rows permuted to llama.cpp's interleaved RoPE pairs
  (`LlamaModel.permute`); Qwen2 and GPT-2 stored as in HF;
- GPT-2's Conv1D weights transposed to [out, in], its `attn.bias` masks dropped and the tied
  head also written as `output.weight` (`GPT2Model.modify_tensors`);
- types: 1-D tensors, norms, the MoE router and learned positions F32; every other matrix in
  the file's type, F16 where its rows do not fit a block (the converter's fallback);
- metadata: `general.architecture`, `{arch}.*` hyper-parameters, `general.file_type`, and a
  placeholder `tokenizer.ggml.*` vocabulary (token strings `<t{i}>`) so llama.cpp would load it.

Q4_0 files are written as `llama-quantize --pure` would (every matrix Q4_0; without --pure
llama.cpp would put the head in Q6_K, which the gguf package cannot quantize).

    /work/venv/bin/python scripts/make_gguf_fixtures.py   # writes tests/fixtures/gguf/*.gguf
"""

import json
import os
import sys

import gguf
import numpy as np
from safetensors.numpy import load_file

OUT = "tests/fixtures/gguf"
FILES = {
    "tiny-llama": ["F32", "F16", "Q8_0", "Q4_0"],
    "tiny-gpt2": ["F16", "Q8_0"],
    "tiny-qwen2": ["F16", "Q8_0"],
    "tiny-mixtral": ["F16", "Q8_0"],
}
ARCH = {"llama": "llama", "mixtral": "llama", "mistral": "llama", "qwen2": "qwen2", "gpt2": "gpt2"}
FTYPE = {
    "F32": gguf.LlamaFileType.ALL_F32,
    "F16": gguf.LlamaFileType.MOSTLY_F16,
    "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
}
Q = gguf.GGMLQuantizationType


def permute(w, n_head):
    # convert_hf_to_gguf.py LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_tensors(folder, cfg):
    """(gguf name, numpy f32 array) in llama.cpp's conventions."""
    st = load_file(os.path.join(folder, "model.safetensors"))
    mt = cfg["model_type"]
    arch = ARCH[mt]
    n_layer = cfg.get("num_hidden_layers", cfg.get("n_layer"))
    nmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()] if arch != "gpt2" else gguf.MODEL_ARCH.GPT2, n_layer)
    out = []
    experts = {}
    for name in sorted(st):
        data = st[name].astype(np.float32)
        if name.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")):
            continue
        if mt == "gpt2" and name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            data = data.T.copy()
        if arch == "llama":
            nh = cfg["num_attention_heads"]
            nkv = cfg.get("num_key_value_heads", nh)
            if name.endswith(("q_proj.weight", "q_proj.bias")):
                data = permute(data, nh)
            if name.endswith(("k_proj.weight", "k_proj.bias")):
                data = permute(data, nkv)
        if ".block_sparse_moe.experts." in name:
            # model.layers.N.block_sparse_moe.experts.E.wK.weight
            parts = name.split(".")
            layer, e, w = int(parts[2]), int(parts[5]), parts[6]
            experts.setdefault((layer, w), {})[e] = data
            continue
        new = nmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            sys.exit(f"{folder}: no GGUF name for {name}")
        out.append((new, data))
        if mt == "gpt2" and new == "token_embd.weight":
            out.append(("output.weight", data))
    stacked = {"w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"}
    for (layer, w), per in sorted(experts.items()):
        out.append((f"blk.{layer}.{stacked[w]}.weight", np.stack([per[e] for e in sorted(per)])))
    return out


def tensor_type(name, data, ftype):
    if data.ndim <= 1 or name.endswith("_norm.weight"):
        return Q.F32
    if "ffn_gate_inp" in name or name == "position_embd.weight":
        return Q.F32
    return {"F32": Q.F32, "F16": Q.F16, "Q8_0": Q.Q8_0, "Q4_0": Q.Q4_0}[ftype]


def write(folder, ftype):
    cfg = json.load(open(os.path.join(folder, "config.json")))
    mt = cfg["model_type"]
    arch = ARCH[mt]
    name = os.path.basename(folder)
    path = os.path.join(OUT, f"{name}-{ftype.lower()}.gguf")
    w = gguf.GGUFWriter(path, arch)
    w.add_name(name)
    w.add_file_type(FTYPE[ftype])
    if ftype in ("Q8_0", "Q4_0"):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if mt == "gpt2":
        d = cfg["n_embd"]
        w.add_context_length(cfg["n_positions"])
        w.add_embedding_length(d)
        w.add_feed_forward_length(cfg.get("n_inner") or 4 * d)
        w.add_block_count(cfg["n_layer"])
        w.add_head_count(cfg["n_head"])
        w.add_layer_norm_eps(cfg["layer_norm_epsilon"])
        tok_model = "gpt2"
    else:
        d = cfg["hidden_size"]
        nh = cfg["num_attention_heads"]
        hd = cfg.get("head_dim") or d // nh
        w.add_context_length(cfg["max_position_embeddings"])
        w.add_embedding_length(d)
        w.add_feed_forward_length(cfg["intermediate_size"])
        w.add_block_count(cfg["num_hidden_layers"])
        w.add_head_count(nh)
        w.add_head_count_kv(cfg.get("num_key_value_heads", nh))
        w.add_rope_freq_base(cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"])
        w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
        w.add_rope_dimension_count(hd)
        if hd != d // nh:
            w.add_key_length(hd)
            w.add_value_length(hd)
        if mt == "mixtral":
            w.add_expert_count(cfg["num_local_experts"])
            w.add_expert_used_count(cfg["num_experts_per_tok"])
        tok_model = "llama" if arch == "llama" else "gpt2"
    vocab = cfg["vocab_size"]
    w.add_tokenizer_model(tok_model)
    w.add_token_list([f"<t{i}>" for i in range(vocab)])
    w.add_token_types([gguf.TokenType.NORMAL] * vocab)
    if tok_model == "llama":
        w.add_token_scores([0.0] * vocab)
    else:
        w.add_token_merges([])
    w.add_bos_token_id(cfg.get("bos_token_id") or 0)
    w.add_eos_token_id(cfg.get("eos_token_id") or 0)
    for tname, data in hf_tensors(folder, cfg):
        qt = tensor_type(tname, data, ftype)
        if qt in (Q.F32,):
            w.add_tensor(tname, data.astype(np.float32))
            continue
        try:
            q = gguf.quants.quantize(data, qt)
        except gguf.QuantError:
            qt = Q.F16
            q = gguf.quants.quantize(data, qt)
        w.add_tensor(tname, q, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"{path}: {os.path.getsize(path)} bytes", file=sys.stderr)


def main():
    os.makedirs(OUT, exist_ok=True)
    for folder, types in FILES.items():
        for t in types:
            write(os.path.join("tests/fixtures", folder), t)


if __name__ == "__main__":
    main()

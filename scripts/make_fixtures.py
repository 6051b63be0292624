"""Make the reference checkpoints this project adds to tests/fixtures with HF transformers.

usage: /path/to/venv/bin/python scripts/make_fixtures.py [NAME ...] [--out DIR]
       NAME: tiny-gemma3, tiny-phi3-longrope (default: both); DIR default tests/fixtures
       (needs torch, transformers 5.24, safetensors; byte-for-byte reproducible)

Same recipe and layout as the other fixtures (see tests/fixtures/README.md): float32, eager
attention, dropout 0, weight matrices and the embedding drawn N(0, 0.08) so that numerical
differences show, norm weights N(0, 0.1) around their init (Gemma scales by 1 + w, so "near 0"
is the interesting regime; plain RMSNorm weights are drawn around 1), then

  config.json, model.safetensors   save_pretrained (a tied head is stored once)
  expected.safetensors              input_ids (i64 [B, T]) and logits (f32 [B, T, V]), model.eval()
  expected.json                     loss (labels = input_ids, shifted inside HF), params,
                                    grad_norm (name -> L2 norm of d loss / d parameter), batch, seq

tiny-gemma3, beyond Gemma 2's layout: RMSNorm over head_dim on q and k ((1 + w) scaling), local
and global layers from transformers 5's `layer_types` (window 5 < seq 16 on the local layers), a
RoPE base per layer type (`rope_parameters.sliding_attention` 10,000, and `full_attention`
1,000,000 with linear scaling by 8, as Gemma 3 4B+ ship it), query_pre_attn_scalar (40)
different from head_dim (24 ≠ 64 / 4), no soft-capping, tied head.

tiny-phi3-longrope: LongRoPE with seq 16 beyond the original context of 8 (so the long factors
and the attention factor √(1 + ln 8 / ln 8) apply), partial_rotary_factor 0.5 (RoPE on 8 of 16
channels), GQA 4/2, a sliding window of 6 on every layer, fused qkv_proj / gate_up_proj, pad id
0 in the batch.
"""
import json, os, sys

import torch
import transformers
from safetensors.torch import save_file
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, Phi3Config, Phi3ForCausalLM

BATCH, SEQ = 2, 16
MATRIX_STD, NORM_STD = 0.08, 0.1


def gemma3():
    cfg = Gemma3TextConfig(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        max_position_embeddings=64,
        query_pre_attn_scalar=40,
        sliding_window=5,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
        },
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        attention_dropout=0.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return Gemma3ForCausalLM, cfg, 0.0


def phi3_longrope():
    pairs = 4  # partial_rotary_factor 0.5 of head_dim 16: 8 rotated channels
    cfg = Phi3Config(
        vocab_size=93,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        original_max_position_embeddings=8,
        sliding_window=6,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10_000.0,
            "partial_rotary_factor": 0.5,
            "short_factor": [1.0 + 0.25 * i for i in range(pairs)],
            "long_factor": [2.0 + 3.0 * i for i in range(pairs)],
            "original_max_position_embeddings": 8,
        },
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return Phi3ForCausalLM, cfg, 1.0


RECIPES = {"tiny-gemma3": gemma3, "tiny-phi3-longrope": phi3_longrope}


def make(name, root):
    out = os.path.join(root, name)
    torch.manual_seed(0)
    cls, cfg, norm_center = RECIPES[name]()
    model = cls._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(norm_center, NORM_STD)
            else:
                p.normal_(0.0, MATRIX_STD)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    # The other fixtures carry no generation settings: nothing here reads them.
    os.remove(os.path.join(out, "generation_config.json"))

    ids = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), dtype=torch.int64)
    if name == "tiny-phi3-longrope":
        ids[0, 3] = cfg.pad_token_id  # its embedding row must get no gradient
    model.eval()
    res = model(input_ids=ids, labels=ids)
    res.loss.backward()
    grad_norm = {n: p.grad.norm().item() for n, p in model.named_parameters()}
    save_file({"input_ids": ids.contiguous(), "logits": res.logits.detach().float().contiguous()},
              os.path.join(out, "expected.safetensors"))
    params = sum(p.numel() for p in model.parameters())
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump({
            "batch": BATCH,
            "generated_by": f"transformers {transformers.__version__}, torch {torch.__version__}, "
                            "eager attention, float32",
            "grad_norm": grad_norm,
            "loss": res.loss.item(),
            "params": params,
            "seq": SEQ,
        }, f, indent=2, sort_keys=True)
    for n in os.listdir(out):
        os.chmod(os.path.join(out, n), 0o644)
    print(f"wrote {out}: loss {res.loss.item():.6f}, params {params}")


if __name__ == "__main__":
    args = sys.argv[1:]
    root = "tests/fixtures"
    if "--out" in args:
        i = args.index("--out")
        root = args[i + 1]
        del args[i:i + 2]
    for name in args or list(RECIPES):
        make(name, root)

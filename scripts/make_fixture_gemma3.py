"""Make the tiny-gemma3 reference checkpoint (tests/fixtures/tiny-gemma3) with HF transformers.

usage: /path/to/venv/bin/python scripts/make_fixture_gemma3.py [OUT_DIR]
       (default OUT_DIR: tests/fixtures/tiny-gemma3; needs torch, transformers 5.24, safetensors)

Same recipe and layout as the other fixtures (see tests/fixtures/README.md): float32, eager
attention, dropout 0, weight matrices and the embedding drawn N(0, 0.08) so that numerical
differences show, norm weights drawn N(0, 0.1) (Gemma scales by 1 + w, so "near 0" is the
interesting regime), then

  config.json, model.safetensors   save_pretrained (a tied head is stored once)
  expected.safetensors              input_ids (i64 [B, T]) and logits (f32 [B, T, V]), model.eval()
  expected.json                     loss (labels = input_ids, shifted inside HF), params,
                                    grad_norm (name -> L2 norm of d loss / d parameter), batch, seq

What it exercises, beyond Gemma 2's layout: RMSNorm over head_dim on q and k ((1 + w) scaling),
local and global layers from transformers 5's `layer_types` (window 5 < seq 16 on the local
layers), a RoPE base per layer type (`rope_parameters.sliding_attention` 10,000, and
`full_attention` 1,000,000 with linear scaling by 8, as Gemma 3 4B+ ship it),
query_pre_attn_scalar (40) different from head_dim (24 ≠ 64 / 4), no soft-capping, tied head.
"""
import json, os, sys

import torch
import transformers
from safetensors.torch import save_file
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

OUT = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/tiny-gemma3"
BATCH, SEQ = 2, 16
MATRIX_STD, NORM_STD = 0.08, 0.1

torch.manual_seed(0)
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
model = Gemma3ForCausalLM._from_config(cfg, attn_implementation="eager", torch_dtype=torch.float32)
with torch.no_grad():
    for name, p in model.named_parameters():
        std = NORM_STD if p.dim() == 1 else MATRIX_STD
        p.normal_(0.0, std)

os.makedirs(OUT, exist_ok=True)
model.save_pretrained(OUT)
# The other fixtures carry no generation settings: nothing here reads them.
os.remove(os.path.join(OUT, "generation_config.json"))

ids = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), dtype=torch.int64)
model.eval()
out = model(input_ids=ids, labels=ids)
out.loss.backward()
grad_norm = {name: p.grad.norm().item() for name, p in model.named_parameters()}
save_file({"input_ids": ids.contiguous(), "logits": out.logits.detach().float().contiguous()},
          os.path.join(OUT, "expected.safetensors"))
with open(os.path.join(OUT, "expected.json"), "w") as f:
    json.dump({
        "batch": BATCH,
        "generated_by": f"transformers {transformers.__version__}, torch {torch.__version__}, "
                        "eager attention, float32",
        "grad_norm": grad_norm,
        "loss": out.loss.item(),
        "params": sum(p.numel() for p in model.parameters()),
        "seq": SEQ,
    }, f, indent=2, sort_keys=True)
for name in os.listdir(OUT):
    os.chmod(os.path.join(OUT, name), 0o644)
print(f"wrote {OUT}: loss {out.loss.item():.6f}, params {sum(p.numel() for p in model.parameters())}")

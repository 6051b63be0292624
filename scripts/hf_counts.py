"""Exact parameter counts of real HF configs, computed by HF transformers itself.

usage: /path/to/venv/bin/python scripts/hf_counts.py [CONFIG_JSON ...]
       (default: every tests/data/configs/*.json)

For each config.json the causal LM is built on PyTorch's meta device (no memory, no weights)
with `AutoModelForCausalLM.from_config`, and the count is the sum of `numel` over
`named_parameters()`, which yields a tied weight once. A multimodal `gemma3` config is counted
as its text model only (`Gemma3ForCausalLM` built from `text_config`), as truesize counts it.

The active count of a mixture-of-experts model is read from the same modules: everything outside
the experts, plus `num_experts_per_tok / num_experts` of each sparse layer's experts.

Prints one JSON line per config: name, model_type, params, active_params. The Rust tests hold
these numbers (tests/real_configs.rs); CI never runs Python. Measured with transformers 5.24.0,
torch 2.15.
"""
import glob, json, os, sys

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM


def load(path):
    with open(path) as f:
        raw = json.load(f)
    cfg = transformers.CONFIG_MAPPING[raw["model_type"]].from_dict(raw)
    if cfg.model_type == "gemma3":
        cfg = cfg.text_config  # the text model only: the vision tower is not counted
    return cfg


def count(path):
    cfg = load(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    total = sum(p.numel() for _, p in model.named_parameters())
    active = total
    n_exp = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
    if n_exp:
        top_k = cfg.num_experts_per_tok
        experts = 0
        for name, module in model.named_modules():
            if name.endswith(".experts"):
                experts += sum(p.numel() for p in module.parameters())
        assert experts % n_exp == 0
        active = total - experts + experts // n_exp * top_k
    return {
        "name": os.path.splitext(os.path.basename(path))[0],
        "model_type": cfg.model_type,
        "params": total,
        "active_params": active,
    }


if __name__ == "__main__":
    paths = sys.argv[1:] or sorted(glob.glob("tests/data/configs/*.json"))
    print(f"# transformers {transformers.__version__}, torch {torch.__version__}", file=sys.stderr)
    for p in paths:
        print(json.dumps(count(p)))

"""HF transformers' training step under CPU autocast (PyTorch AMP: f32 master weights, the
forward and the loss inside `torch.autocast("cpu", dtype)`, the backward outside), measured as
the peer script torch_memory.py measures the plain step.

usage: torch-amp-memory.py PEERS/torch_memory.py CONFIG_JSON BATCH SEQ [--amp bf16|f16]
                           [--saved] [torch_memory.py's flags, --dtype excepted]

Default: torch_memory.py runs unchanged (its resident-set method, its JSON line) with the
model's forward wrapped in autocast; `peak_above_base_bytes` compares with truesize's
`verify --dtype bf16 --amp` `memory.peak_above_weights_bytes`.

--saved: instead, one step with `torch.autograd.graph.saved_tensors_hooks` and prints what
autograd keeps for backward, deduplicated by storage and attributed to the innermost module that
was running when the tensor was first saved, per module kind: count, dtype, bytes. Weight copies
(autocast's cached casts of the parameters) are listed apart.
"""
import os, runpy, sys

if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable] + sys.argv)

import torch
import transformers

peer = sys.argv[1]
args = sys.argv[2:]
amp = torch.bfloat16
saved_mode = False
rest = []
i = 0
while i < len(args):
    if args[i] == "--amp":
        amp = {"bf16": torch.bfloat16, "f16": torch.float16}[args[i + 1]]
        i += 2
        continue
    if args[i] == "--saved":
        saved_mode = True
    elif args[i] == "--dtype":
        sys.exit("--dtype: AMP keeps f32 master weights; give the compute dtype with --amp")
    else:
        rest.append(args[i])
    i += 1

from_config = transformers.AutoModelForCausalLM.from_config


def autocast_model(*a, **kw):
    model = from_config(*a, **kw)
    forward = model.forward

    def amp_forward(*fa, **fkw):
        with torch.autocast("cpu", dtype=amp):
            return forward(*fa, **fkw)

    model.forward = amp_forward
    return model


transformers.AutoModelForCausalLM.from_config = autocast_model

if not saved_mode:
    sys.argv = [peer] + rest + ["--dtype", "f32"]
    runpy.run_path(peer, run_name="__main__")
    sys.exit(0)

# --saved: what autograd keeps, by module kind.
import collections, json
from transformers import AutoConfig

cfg_path, batch, seq = rest[0], int(rest[1]), int(rest[2])
attn = rest[rest.index("--attn") + 1] if "--attn" in rest else "sdpa"
cfg = AutoConfig.from_pretrained(cfg_path)
torch.manual_seed(0)
model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
model.train()
ids = torch.randint(0, cfg.vocab_size, (batch, seq))
params = {p.untyped_storage().data_ptr() for p in model.parameters()}
shapes = {tuple(p.shape) for p in model.parameters()}
stack = ["(top)"]


def pre(m, _):
    stack.append(type(m).__name__)


def post(m, _, __):
    stack.pop()


for m in model.modules():
    m.register_forward_pre_hook(pre)
    m.register_forward_hook(post)

seen = {}


def pack(t):
    ptr = t.untyped_storage().data_ptr()
    if ptr not in seen and ptr not in params:
        kind = ("weight copy" if tuple(t.shape) in shapes and t.is_floating_point()
                and t.dtype != torch.float32 else stack[-1])
        seen[ptr] = (kind, str(t.dtype).replace("torch.", ""), tuple(t.shape),
                     t.untyped_storage().nbytes())
    return t


with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    out = model(input_ids=ids, labels=ids)
by = collections.defaultdict(lambda: [0, 0])
for kind, dt, shape, nbytes in seen.values():
    key = f"{kind} {dt}"
    by[key][0] += 1
    by[key][1] += nbytes
print(json.dumps({
    "config": cfg_path, "batch": batch, "seq": seq, "amp": str(amp).replace("torch.", ""),
    "logits": [str(out.logits.dtype), out.logits.untyped_storage().nbytes()],
    "saved_bytes": sum(v[3] for v in seen.values()),
    "by_module": {k: {"tensors": v[0], "bytes": v[1]} for k, v in sorted(by.items())},
    "tensors": sorted((k, d, list(s), n) for k, d, s, n in seen.values()),
}))

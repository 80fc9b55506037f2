"""
LoRA students: the student is the frozen teacher plus small low-rank adapters.

A LoRA layer computes y = W x + b + (alpha / r) B A x. W and b are the teacher's, frozen;
A [r, in] starts random and B [out, r] at zero, so at step 0 the student is exactly the teacher,
and only A and B are trained (r (in + out) numbers instead of in x out).

In LADD the student starts as a copy of the teacher, so a LoRA student needs no copy at all: it
is built over the teacher's own tensors (one copy of the big weights in memory), and only the
adapters have gradients, AdamW moments and an EMA. The teacher stays a plain module over the same
tensors: its features are the network without adapters by construction, with nothing to switch
off (a switch would be invisible to gradient checkpointing, which re-runs blocks in backward).

    student = lora.add_adapters(teacher, rank=16)          # shares every teacher tensor
    lora.without_adapters(student)                         # the same network, adapters off
    state = lora.merged_state(student)                     # W + (alpha / r) B A: a plain MMDiT
    lora.save_adapters(student, "adapters.safetensors")    # the adapters alone, settings in metadata
    model = lora.merge_file(base_model, "adapters.safetensors")   # sampling: merged into a base

An adapter file records the fingerprint of the base it was trained on (and of that base with the
adapters merged), so merging refuses another base, and a model that already has them merged.

Which layers: the joint blocks' attention (`attn`: qkv and the output projection of both
streams, the common choice for SD3 LoRAs), optionally their MLPs (`mlp`) and adaLN modulations
(`mod`).
"""

import hashlib
import json
import math
import sys
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

import mmdit
import weights

TARGETS = {"attn": ("attn.qkv", "attn.proj"), "mlp": ("mlp.fc1", "mlp.fc2"),
           "mod": ("adaLN_modulation",)}


class LoRALinear(nn.Linear):
    """A linear layer whose weight and bias are another layer's (shared, frozen) plus a trained
    low-rank update. Its state dict keeps the layer's keys (weight, bias) and adds lora_A, lora_B."""

    def __init__(self, base, rank, alpha):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias           # the same tensors, not copies
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device))   # fp32
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))       # nn.Linear's init
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))

    def forward(self, x):
        update = F.linear(F.linear(x, self.lora_A), self.lora_B)    # [..., out], rank r inside
        return F.linear(x, self.weight, self.bias) + self.scale * update

    def delta(self):
        """(alpha / r) B A [out, in] in fp32: what merging adds to the weight."""
        return self.scale * (self.lora_B.float() @ self.lora_A.float())


def parse_targets(text):
    """'attn,mlp' -> the layer-name endings it covers; a one-line error for an unknown name."""
    names = [n for n in str(text).split(",") if n]
    unknown = [n for n in names if n not in TARGETS]
    if not names or unknown:
        raise ValueError(f"--lora-targets {text!r}: want a comma-separated subset of "
                         f"{', '.join(TARGETS)}")
    return tuple(end for n in names for end in TARGETS[n])


def _targets(model, targets):
    """(parent module, attribute, name) of each nn.Linear in the joint blocks that a target ends."""
    ends = parse_targets(targets)
    found = []
    for name, module in model.named_modules():
        plain = ".".join(p for p in name.split(".") if not p.isdigit())  # adaLN_modulation.1
        if (name.startswith("joint_blocks.") and type(module) is nn.Linear
                and plain.endswith(ends)):
            parent_name, _, attr = name.rpartition(".")
            found.append((model.get_submodule(parent_name), attr, name))
    return found


def check_rank(rank, config, targets="attn"):
    """A rank from 1 to the narrowest adapted layer's width (B A has no higher rank), checked
    from the config alone, before any adapter is made."""
    if rank < 1:
        raise ValueError(f"--lora {rank}: the rank must be >= 1 (0 trains every weight)")
    with torch.device("meta"):
        layers = [getattr(parent, attr) for parent, attr, _ in _targets(mmdit.MMDiT(config), targets)]
    widest = min((min(m.in_features, m.out_features) for m in layers), default=rank)
    if rank > widest:
        raise ValueError(f"--lora {rank}: the rank can be at most {widest}, the width of the "
                         f"narrowest adapted layer ({targets} of a hidden size "
                         f"{config.hidden_size}); a larger rank adds nothing but memory")


def add_adapters(teacher, rank, alpha=None, targets="attn"):
    """A LoRA student over the teacher's own tensors: an MMDiT of the teacher's config whose
    parameters and buffers ARE the teacher's (frozen), with adapters (trainable, fp32) on the
    target layers. Draws A from torch's global generator (seed it first). alpha None: = rank."""
    check_rank(rank, teacher.config, targets)
    with torch.device("meta"):
        student = mmdit.MMDiT(teacher.config)
    student.load_state_dict(teacher.state_dict(), assign=True)   # shares, copies nothing
    student.requires_grad_(False)
    for parent, attr, _ in _targets(student, targets):
        setattr(parent, attr, LoRALinear(getattr(parent, attr), rank, rank if alpha is None else alpha))
    student.lora = {"rank": rank, "alpha": rank if alpha is None else alpha, "targets": targets}
    return student


def without_adapters(model):
    """The same network with its adapters off: a plain MMDiT over the LoRA model's own tensors
    (in LADD: the teacher)."""
    with torch.device("meta"):
        plain = mmdit.MMDiT(model.config)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if ".lora_" not in k},
                          assign=True)
    return plain.requires_grad_(False)


def is_lora(model):
    return getattr(model, "lora", None) is not None


def layers(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def adapter_state(model):
    """The adapters alone: {layer.lora_A, layer.lora_B} (what is trained, saved and resumed)."""
    return {f"{name}.{k}": getattr(m, k) for name, m in layers(model) for k in ("lora_A", "lora_B")}


def load_adapter_state(model, state, source="adapters"):
    """Set a LoRA model's adapters from adapter_state's form; every key must match, or a
    one-line error says what differs."""
    mine = adapter_state(model)
    if set(state) != set(mine):
        extra, missing = sorted(set(state) - set(mine)), sorted(set(mine) - set(state))
        raise ValueError(f"{source}: its adapters do not fit this model: {len(missing)} missing "
                         f"(e.g. {missing[:1]}), {len(extra)} unexpected (e.g. {extra[:1]})")
    with torch.no_grad():
        for k, v in state.items():
            if v.shape != mine[k].shape:
                raise ValueError(f"{source}: {k} is {list(v.shape)}, this model's is "
                                 f"{list(mine[k].shape)} (another rank or base)")
            mine[k].copy_(v)


def _merged_weight(m):
    return (m.weight.float() + m.delta()).to(m.weight.dtype)


def merged_state(model):
    """A plain MMDiT state dict (the SD3 keys): each adapted weight W + (alpha / r) B A, in
    W's dtype; every other tensor as it is."""
    state = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    for name, m in layers(model):
        state[f"{name}.weight"] = _merged_weight(m)
    return state


FINGERPRINT_VALUES = 64  # values read from each tensor


def fingerprint(model, merged=False):
    """A cheap, deterministic fingerprint of a model's base weights (adapters left out; merged:
    the base with its adapters merged, one weight at a time): sha256 over each tensor's name,
    shape and FINGERPRINT_VALUES evenly spaced values, rounded to bf16 so that the same weights
    held in fp32 or bf16, on any device, give the same digest (fp16 rounds differently)."""
    state = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    adapted = {f"{name}.weight": m for name, m in layers(model)} if merged else {}
    digest = hashlib.sha256()
    for name in sorted(state):
        t = (_merged_weight(adapted[name]) if name in adapted else state[name]).detach()
        n = t.numel()
        k = min(n, FINGERPRINT_VALUES)
        index = torch.arange(k) * (n - 1) // max(k - 1, 1)        # first and last included
        values = t.reshape(-1)[index.to(t.device)].cpu()
        if values.is_floating_point():
            values = values.to(torch.bfloat16).view(torch.int16)
        digest.update(f"{name}{list(t.shape)}".encode() + values.numpy().tobytes())
    return digest.hexdigest()[:16]


def save_adapters(model, path, metadata=None):
    """The adapters alone as safetensors; rank, alpha, targets and the base's architecture in
    the metadata (plus any extra string metadata, e.g. the student's sampling defaults)."""
    meta = {"kind": "lora", "lora": json.dumps(model.lora),
            "base_config": json.dumps(asdict(model.config)), **(metadata or {}),
            "base_fingerprint": fingerprint(model), "merged_fingerprint": fingerprint(model, True)}
    weights.save_file(adapter_state(model), path, meta)


def read_adapters(path, config):
    """-> (adapter tensors, their settings, the file's metadata), refusing a file made for a base
    of another architecture."""
    meta = weights.load_metadata(path)
    if meta.get("kind") != "lora":
        raise ValueError(f"{path}: not a LoRA adapter file (save one with lora.save_adapters, "
                         "or train one with train_ladd.py --lora RANK)")
    base = json.loads(meta["base_config"])
    differ = [f"{k} {v} (this base: {getattr(config, k)})" for k, v in base.items()
              if json.loads(json.dumps(getattr(config, k))) != v]
    if differ:
        raise ValueError(f"{path}: adapters for another architecture: {', '.join(differ)}; pass "
                         "the base checkpoint they were trained on")
    tensors = weights.load_file(path)
    weights.check_finite(tensors, path)
    return tensors, json.loads(meta["lora"]), meta


def _saved_together(model_meta, meta):
    """Whether a checkpoint and an adapter file were written by the same save of one run."""
    keys = ("command", "train_config", "train_steps")
    return "train_config" in meta and all(model_meta.get(k) == meta.get(k) for k in keys)


def check_base(model, path, meta, ckpt="this checkpoint", base=None):
    """The adapters of `path` (its metadata `meta`) fit `model`: the fingerprint of the base
    they were trained on, not another base, nor one that has them merged already. base: the
    model to fingerprint, when `model` is held in another dtype (fp16) than its file's."""
    want, merged = meta.get("base_fingerprint"), meta.get("merged_fingerprint")
    if want is None:
        print(f"warning: {path}: an older adapter file, without the fingerprint of its base; "
              f"cannot check that {ckpt} is the model it was trained on", file=sys.stderr)
        return
    got = fingerprint(base if base is not None else model)
    trained_on = meta.get("teacher", "the checkpoint they were trained on")
    if got == merged and (merged != want or _saved_together(getattr(model, "metadata", {}), meta)):
        raise ValueError(f"{ckpt} already has the adapters of {path} merged in; pass --ckpt {ckpt} "
                         f"alone, or its base: --ckpt {trained_on} --lora {path}")
    if got != want:
        raise ValueError(f"{path}: adapters trained on another base (fingerprint {want}; {ckpt}'s "
                         f"is {got}); pass the base they were trained on: --ckpt {trained_on}")


def merge_file(model, path, ckpt="this checkpoint", base=None):
    """Merge an adapter file into a plain MMDiT in place (W += (alpha / r) B A) for sampling,
    after check_base; -> the file's metadata."""
    tensors, settings, meta = read_adapters(path, model.config)
    check_base(model, path, meta, ckpt, base)
    names = [name for _, _, name in _targets(model, settings["targets"])]
    if set(tensors) != {f"{n}.lora_{k}" for n in names for k in "AB"}:
        raise ValueError(f"{path}: its tensors do not match its settings {settings}")
    with torch.no_grad():
        for name in names:
            w = model.get_submodule(name).weight
            delta = settings["alpha"] / settings["rank"] * (
                tensors[f"{name}.lora_B"].float() @ tensors[f"{name}.lora_A"].float())
            w.copy_(w.float() + delta.to(w.device))
    return meta


if __name__ == "__main__":  # the memory plan: a LoRA student next to a full one, per SD3 config
    from discriminator import Discriminator
    GiB = 2 ** 30
    print("GiB held before activations: teacher bf16 (shared by a LoRA student); trained weights, "
          "their gradients, two AdamW moments and EMA fp32 (20 bytes each); heads 16 bytes a parameter")
    for name in ("sd3-medium", "sd3.5-large"):
        with torch.device("meta"):  # the models as built, without memory
            teacher = mmdit.MMDiT(mmdit.CONFIGS[name])
            heads = 16 * mmdit.count_params(Discriminator.for_teacher(teacher.config))
        base = 2 * sum(t.numel() for t in (*teacher.parameters(), *teacher.buffers()))
        rows = [("full student", mmdit.count_params(teacher))]
        rows += [(f"LoRA {targets} rank {rank}", sum(
            p.numel() for p in add_adapters(teacher, rank, targets=targets).parameters()
            if p.requires_grad)) for targets in ("attn", "attn,mlp,mod") for rank in (16, 64)]
        for label, trained in rows:
            print(f"{name:12s} {label:26s} trained {trained / 1e6:8.1f} M   held "
                  f"{(base + 20 * trained + heads) / GiB:6.1f}")

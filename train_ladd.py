"""
Latent Adversarial Diffusion Distillation: a many-step, guided teacher becomes a few-step,
unguided student.

    python train_ladd.py                          # the shipped shapes teacher -> a 4-step student
    python train_ladd.py --resume runs/ladd       # continue a stopped run exactly
    python train_ladd.py --teacher sd3_medium.safetensors --cond cond.safetensors --out runs/sd3

One step (the README's "How LADD works here" has the details and the measured choices):
  data     x0 = a latent the teacher generated itself (guided, many steps), with its prompt
  student  t in {1, .75, .5, .25}; x_t = (1 - t) x0 + t eps; x0_hat = x_t - t student(x_t, t)
  re-noise t_hat ~ logit-normal(0, 2); fake = noised x0_hat, real = noised x0 (same t_hat)
  judge    the frozen teacher runs on both; a small head per block reads its image tokens
  losses   heads: hinge (real up, fake down); student: -logit(fake), back-propagated
           through the frozen teacher into the student
The student starts as a copy of the teacher, never sees guidance, and samples in 4 steps.

Everything random in a step (batch, times, noises) is drawn from a generator seeded by
(seed, step), so `--resume` continues exactly where an interrupted run stopped. The synthetic
dataset is generated once and cached under --data-dir, shared by all runs with the same settings.
"""

import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import flow
import inpaint
import mmdit
import shapes
import weights
from discriminator import Discriminator, approx_r1, hinge_d_loss, hinge_g_loss
from sample import (DTYPES, Conditioning, Pipeline, UnavailableTextEncoder, encode, generate,
                    load_cond, load_pipeline, pick_dtype, read_prompts, run_cli,
                    save_strip)
from train_teacher import (SHIPPED, World, ema_update, init_world, parse_given, resolve_config,
                           step_generator)


@dataclass
class Config:
    out: str = "runs/ladd"             # run folder: student, state, log.jsonl, comparison grids
    resume: str = ""                   # a run folder to continue
    preset: str = "default"            # default | test (a few tiny steps, for tests)
    teacher: str = ""                  # MMDiT checkpoint file or run folder ("": the shipped one)
    task: str = "t2i"                  # t2i | inpaint (an inpainting teacher; shapes world)
    student_config: str = ""           # mmdit.CONFIGS name of a different student ("": the teacher's)
    prompts: str = ""                  # prompts file, one a line ("": random shapes-world captions)
    cond: str = ""                     # precomputed conditioning file or shard folder, not prompts
    seed: int = 0                      # data, noise, heads and student init all derive from it
    device: str = "auto"               # auto: cuda, then mps, then cpu
    dtype: str = "auto"                # autocast dtype: auto = bf16 on CUDA, fp32 elsewhere
    # data
    data: str = "synthetic"            # synthetic: teacher latents | real: world renders via the VAE
    data_size: int = 576               # latents in the dataset, split evenly over the sizes
    data_dir: str = "runs/data"        # dataset cache; reused by every run with the same settings
    data_steps: int = 0                # teacher sampling steps for synthetic data (0: its default)
    data_cfg: float = 0.0              # teacher guidance for synthetic data (0: its default)
    # LADD
    steps: int = 1600                  # student (generator) updates, one head update each
    batch_size: int = 8                # latents per step, all of one size (aspect-ratio bucket)
    lr: float = 1e-5                   # student AdamW
    disc_lr: float = 1e-3              # heads AdamW, beta1 = 0
    optim_dtype: str = "fp32"          # the student's AdamW moments: fp32 | bf16 (half the memory)
    disc_blocks: str = "all"           # teacher blocks with a head: all | lastN | 0,2,3
    disc_hidden: int = 48              # head width
    times: str = "1,0.75,0.5,0.25"     # the student's timesteps (its sampler's schedule)
    time_probs: str = "0.7,0.1,0.1,0.1"  # how often each is trained
    warmup_probs: str = "0,0,0.5,0.5"  # ... during the first `warmup` steps
    warmup: int = 30                   # steps drawn with warmup_probs
    t_hat_mean: float = 0.0            # re-noising level t_hat ~ logit-normal(mean, std); notes: 1
    t_hat_std: float = 2.0             # its spread: wider judges more low-noise detail; notes: 1
    distill_weight: float = 0.0        # weight of an ADD-style distillation loss (0: none, LADD)
    r1_weight: float = 0.0             # weight of the approximate R1 penalty on the heads
    grad_clip: float = 1.0             # clip both gradients to this norm
    ema: float = 0.995                 # EMA decay of the student used for sampling
    sampler: str = "renoise"           # the student's sampler stored in its checkpoint
    checkpointing: str = "auto"        # gradient checkpointing: auto (on CUDA) | on | off
    compile: bool = False              # torch.compile the student's and teacher's blocks
    shard: bool = False                # under torchrun: FSDP-shard student, EMA, AdamW (8B models)
    # bookkeeping
    log_every: int = 10                # a log.jsonl line every this many steps
    grid_every: int = 200              # comparison grid every this many steps (0: only at the end)
    ckpt_every: int = 200              # resumable state every this many steps
    judge_n: int = 256                 # shapes world: captions judged at the end (0: skip)
    max_minutes: float = 0.0           # stop after this wall time (0: no limit)
    memory_report: bool = False        # print estimated and measured memory per component


PRESETS = {
    "default": {},
    "test": dict(data_size=8, steps=4, batch_size=4, warmup=1, log_every=1, grid_every=0,
                 ckpt_every=2, judge_n=4),
}


def parse_list(text, name, kind=float):
    try:
        return [kind(v) for v in str(text).split(",")]
    except ValueError:
        raise ValueError(f"--{name} {text!r}: want comma-separated numbers, e.g. 1,0.75,0.5,0.25") from None


# ----------------------------------------------------------------------------------------------
# the algorithm: small functions


def student_times(n, step, times, probs, warmup_probs, warmup, generator):
    """The student's training timesteps [n]: drawn from `times` with `warmup_probs` for the first
    `warmup` steps (low noise only: the student first learns to finish images), then `probs`."""
    p = torch.tensor(warmup_probs if step < warmup else probs, dtype=torch.float)
    index = torch.multinomial(p, n, replacement=True, generator=generator)
    return torch.tensor(times, dtype=torch.float)[index]                   # [n]


def with_known(x, extra):
    """An inpainting model's input: x with the mask and known latent appended (t2i: x)."""
    return x if extra is None else torch.cat([x, extra], dim=1)


def generator_step(student, teacher, disc, opt, batch, noise, amp, grad_clip, distill=None,
                   world=World(), extra=None):
    """One student update. batch: x0, context, pooled, t, t_hat; noise: eps (student input) and
    eps_fake (re-noising). Returns the teacher's features of the fake batch (detached: the heads'
    step judges them next) and statistics.

    The teacher's parameters are frozen, but the fake features are computed with autograd on,
    so the heads' verdict flows back through the teacher into the student. The heads are only
    judges here: their parameters are frozen for this step (no gradient is computed for them).
    extra: an inpainting task's mask and known latent [B, 1 + C, H, W], which student and teacher
    read next to every noisy latent (None for text-to-image)."""
    x0, context, pooled, t, t_hat = batch
    disc.requires_grad_(False)
    with autocast(x0, amp):
        x_t = flow.add_noise(x0, noise["eps"], t)                                  # [B, C, H, W]
        v = student(with_known(x_t, extra), t, context, pooled).float()
        x0_hat = flow.x0_from_v(x_t, v, t)                                         # [B, C, H, W]
        fake = flow.add_noise(x0_hat, noise["eps_fake"], t_hat)                   # [B, C, H, W]
        features = teacher.features(with_known(fake, extra), t_hat, context, pooled,
                                    disc.blocks)                                   # [B, D, h, w] each
        logits = disc([f.float() for f in features], t_hat, pooled)
        loss = hinge_g_loss(logits)
        stats = {"g_loss": loss.item()}
        if distill is not None:  # ADD: pull x0_hat to the guided teacher's denoising of `fake`
            weight, uncond_context, uncond_pooled, scale = distill
            with torch.no_grad():
                B = x0.shape[0]
                judge = teacher if extra is None else inpaint.conditioned(teacher, extra)
                v = flow.cfg_velocity(judge, fake.detach(), t_hat, context, pooled,
                                      uncond_context.expand(B, -1, -1),            # [B, L, Dc]
                                      uncond_pooled.expand(B, -1), scale).float()  # [B, Dp]
                target = flow.x0_from_v(fake.detach(), v, t_hat)                   # [B, C, H, W]
            distill_loss = F.mse_loss(x0_hat, target)
            loss = loss + weight * distill_loss
            stats["distill_loss"] = distill_loss.item()
    stats["g_grad_norm"], stats["g_skipped"] = _update(opt, loss, student.parameters(), grad_clip,
                                                       world)
    disc.requires_grad_(True)
    return [f.detach().float() for f in features], stats


def discriminator_step(teacher, disc, opt, batch, fake_features, noise, amp, grad_clip,
                       r1_weight=0.0, generator=None, world=World(), extra=None):
    """One heads update: real = x0 noised to t_hat with fresh noise, judged through the teacher
    without autograd; fake = the generator step's features of the student's x0_hat at the same
    t_hat (reused: the teacher is not run twice on the same input). `disc` may be DDP-wrapped."""
    x0, context, pooled, t, t_hat = batch
    B = x0.shape[0]
    blocks = getattr(disc, "module", disc).blocks
    with torch.no_grad(), autocast(x0, amp):
        real = flow.add_noise(x0, noise["eps_real"], t_hat)                       # [B, C, H, W]
        real_features = teacher.features(with_known(real, extra), t_hat, context, pooled,
                                         blocks)                                   # [B, D, h, w] each
    features = [torch.cat([r.float(), f]) for r, f in zip(real_features, fake_features)]  # [2B, D, h, w]
    with autocast(x0, amp):
        logits = disc(features, t_hat.repeat(2), pooled.repeat(2, 1))             # [2B] each
        real_logits, fake_logits = [l[:B] for l in logits], [l[B:] for l in logits]
        loss = hinge_d_loss(real_logits, fake_logits)
        stats = {"d_loss": loss.item()}
        if r1_weight:
            r1 = approx_r1(disc, [f[:B] for f in features], t_hat, pooled, generator=generator)
            loss = loss + r1_weight / 2 * r1
            stats["r1"] = r1.item()
    stats["d_grad_norm"], stats["d_skipped"] = _update(opt, loss, disc.parameters(), grad_clip,
                                                       world)
    stats["logit_real"] = torch.stack([l.mean() for l in real_logits]).mean().item()
    stats["logit_fake"] = torch.stack([l.mean() for l in fake_logits]).mean().item()
    return stats


class AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) whose two moments are stored in `state_dtype`: bf16 halves
    their memory, 8 -> 4 bytes a weight. The update itself is computed in fp32 each step."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 state_dtype="bf16"):  # a DTYPES name: the state dict stays plain JSON
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      state_dtype=state_dtype))

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)  # which casts the moments to the weights' dtype
        for group in self.param_groups:
            for p in group["params"]:
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in self.state[p]:
                        self.state[p][key] = self.state[p][key].to(DTYPES[group["state_dtype"]])

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            (b1, b2), lr = group["betas"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros(())
                    dtype = DTYPES[group["state_dtype"]]
                    state["exp_avg"] = torch.zeros_like(p, dtype=dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype)
                state["step"] += 1
                k, g = state["step"].item(), p.grad.float()
                m = state["exp_avg"].float().lerp_(g, 1 - b1)                  # first moment
                v = state["exp_avg_sq"].float().mul_(b2).addcmul_(g, g, value=1 - b2)  # second
                state["exp_avg"].copy_(m)
                state["exp_avg_sq"].copy_(v)
                p.mul_(1 - lr * group["weight_decay"])
                denom = (v / (1 - b2 ** k)).sqrt_().add_(group["eps"])
                p.addcdiv_(m.to(p.dtype), denom.to(p.dtype), value=-lr / (1 - b1 ** k))


def make_optimizer(params, lr, betas, device, state_dtype="fp32"):
    """torch's AdamW (fused on CUDA) with fp32 moments, or the AdamW above with `state_dtype`."""
    if state_dtype == "fp32":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=0.0,
                                 fused=device.type == "cuda")
    return AdamW(params, lr=lr, betas=betas, state_dtype=state_dtype)


def autocast(x, amp):
    """Mixed precision in `amp` on x's device; fp32 means none."""
    return torch.autocast(x.device.type, dtype=amp, enabled=amp != torch.float32)


def _update(opt, loss, params, grad_clip, world=World()):
    """backward, clip, step; a step whose loss or gradient is not finite is skipped (and counted),
    so no NaN ever reaches the weights. -> (grad norm, 1 if skipped else 0). With several
    processes the loss must be finite on every rank (all skip together); the gradient, averaged
    by DDP, is the same on every rank."""
    opt.zero_grad(set_to_none=True)
    if not world.all_true(torch.isfinite(loss)):
        return float("nan"), 1
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(list(params), grad_clip)
    if hasattr(norm, "full_tensor"):  # FSDP: a DTensor, the same on every rank
        norm = norm.full_tensor()
    if not torch.isfinite(norm):
        opt.zero_grad(set_to_none=True)
        return norm.item(), 1
    opt.step()
    return norm.item(), 0


# ----------------------------------------------------------------------------------------------
# models


def load_teacher(cfg, device, amp):
    """The teacher's pipeline (MMDiT, VAE, text encoder, sampling defaults), frozen. On CUDA it is
    stored in the autocast dtype: it is never updated, only run and differentiated through."""
    pipe = load_pipeline(cfg.teacher, device, amp if device.type == "cuda" else torch.float32)
    c = pipe.model.config
    if inpaint.is_inpainting_model(pipe.model):
        if cfg.task != "inpaint":
            raise ValueError(f"--teacher {cfg.teacher} is an inpainting model (latent, mask and "
                             "known latent in); pass --task inpaint")
        if not is_shapes(pipe):
            raise ValueError("--task inpaint makes its data in the shapes world (renders and "
                             "masks); the teacher is not a shapes-world model")
    elif c.in_channels != c.out_channels:
        raise ValueError(f"--teacher {cfg.teacher}: a text-to-image MMDiT has as many output as "
                         f"input channels, this one {c.in_channels} -> {c.out_channels}")
    elif cfg.task == "inpaint":
        raise ValueError(f"--task inpaint needs an inpainting teacher, and {cfg.teacher} is a "
                         "text-to-image one; make one with python train_teacher.py --preset inpaint")
    return pipe


def student_config(cfg, teacher_config):
    """The teacher's config, or the named one; the latent channels, text widths and positional
    grid must fit the teacher's (they share data and conditioning)."""
    if not cfg.student_config:
        return teacher_config
    if cfg.student_config not in mmdit.CONFIGS:
        raise ValueError(f"--student-config {cfg.student_config!r}: not a named config; choose one "
                         f"of {', '.join(mmdit.CONFIGS)}")
    s, t = mmdit.CONFIGS[cfg.student_config], teacher_config
    for field in ("in_channels", "out_channels", "context_dim", "pooled_dim", "patch_size"):
        if getattr(s, field) != getattr(t, field):
            raise ValueError(
                f"--student-config {cfg.student_config}: {field} is {getattr(s, field)} but the "
                f"teacher's is {getattr(t, field)}; student and teacher share latents and text "
                f"conditioning, so pick a config with {field}={getattr(t, field)}")
    if s.pos_embed_max_size < t.pos_embed_max_size:
        raise ValueError(f"--student-config {cfg.student_config}: its positional grid "
                         f"({s.pos_embed_max_size}) is smaller than the teacher's "
                         f"({t.pos_embed_max_size})")
    return s


def make_student(cfg, teacher):
    """A copy of the teacher (fp32 master weights), or a smaller model initialised from it."""
    config = student_config(cfg, teacher.config)
    torch.manual_seed(cfg.seed)
    student = mmdit.MMDiT(config)
    copied = init_from_teacher(student, teacher)
    if config != teacher.config:
        print(f"student {cfg.student_config}: {copied} of {len(student.state_dict())} tensors "
              "initialised from the teacher")
    return student


def init_from_teacher(student, teacher):
    """Copy every tensor whose shape fits. Student block j takes teacher block
    round(j (T - 1) / (S - 1)): the first and the last block stay (a shallower copy, as in
    layer-dropping). -> number of tensors copied."""
    S, T = student.config.depth, teacher.config.depth
    source = {j: round(j * (T - 1) / max(S - 1, 1)) for j in range(S)}
    theirs, copied = teacher.state_dict(), 0
    mine = student.state_dict()
    for key in mine:
        name = key
        if key.startswith("joint_blocks."):
            _, j, rest = key.split(".", 2)
            name = f"joint_blocks.{source[int(j)]}.{rest}"
        if name in theirs and theirs[name].shape == mine[key].shape:
            mine[key] = theirs[name].float()
            copied += 1
    student.load_state_dict(mine)
    return copied


# ----------------------------------------------------------------------------------------------
# data: the teacher's own samples (or world renders), cached as safetensors shards


def is_shapes(pipe):
    return isinstance(pipe.text_encoder, shapes.ShapesTextEncoder)


def prompt_source(cfg, pipe):
    """-> (describe: str for the cache key, conditioning(indices) -> (Conditioning, captions))."""
    if cfg.cond and cfg.prompts:
        raise ValueError("--cond replaces --prompts; pass one or the other")
    if cfg.cond:
        cond = load_cond(cfg.cond)
        want = (pipe.model.config.context_dim, pipe.model.config.pooled_dim)
        if (cond.context.shape[-1], cond.pooled.shape[-1]) != want:
            raise ValueError(f"--cond {cfg.cond}: (context, pooled) widths "
                             f"{(cond.context.shape[-1], cond.pooled.shape[-1])} but the teacher "
                             f"takes {want}")

        def take(index):
            rows = [i % len(cond) for i in index]
            return Conditioning(cond.context[rows], cond.pooled[rows], cond.uncond_context,
                                cond.uncond_pooled), [f"cond {r}" for r in rows]
        return f"cond:{_file_id(cfg.cond)}", take
    if cfg.prompts:
        lines = read_prompts([cfg.prompts])
        if not lines:
            raise ValueError(f"--prompts {cfg.prompts}: no prompts in it (one a line)")
        if is_shapes(pipe):
            for n, line in enumerate(lines, 1):
                try:
                    shapes.parse_caption(line)
                except ValueError as e:
                    raise ValueError(f"--prompts {cfg.prompts} line {n}: {e}") from None
        describe = "prompts:" + hashlib.sha1("\n".join(lines).encode()).hexdigest()[:12]

        def pick(index):  # the prompts in turn
            return [lines[i % len(lines)] for i in index]
    elif is_shapes(pipe):
        describe = "shapes-random"

        def pick(index):  # caption i is a pure function of (seed, i)
            return [shapes.random_caption(np.random.default_rng([cfg.seed, i])) for i in index]
    else:
        raise ValueError(f"--teacher {cfg.teacher} is not a shapes-world model: pass --prompts "
                         "FILE (one prompt a line) or --cond FILE (precomputed conditioning)")

    def take(index):
        captions = pick(index)
        return encode(pipe, captions), captions
    return describe, take


def _file_id(path):
    """Names a file's (or a folder of files') contents cheaply: sizes and safetensors headers."""
    files = ([os.path.join(d, f) for d, _, names in sorted(os.walk(path)) for f in sorted(names)
              if f.endswith(".safetensors")] if os.path.isdir(path) else [path])
    text = json.dumps([[os.path.getsize(f), sorted(weights.read_header(f)[1].items()),
                        sorted((k, str(v)) for k, v in weights.read_header(f)[0].items())]
                       for f in files])
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def data_settings(cfg, pipe, describe):
    """Everything the dataset depends on; its hash names the cache folder."""
    d = pipe.defaults
    settings = {"kind": cfg.data, "teacher": _file_id(pipe.path), "prompts": describe,
                "steps": cfg.data_steps or d["steps"], "cfg": cfg.data_cfg or d["cfg"],
                "shift": d.get("shift"), "sampler": d["sampler"],
                "sizes": [list(s) for s in pipe.sizes], "size": cfg.data_size, "seed": cfg.seed}
    return settings if cfg.task == "t2i" else {**settings, "task": cfg.task}


SHARD = 64  # latents per cache file


def build_dataset(cfg, pipe, describe, take, world=World()):
    """-> {(width, height): (latents [N, C, h, w], context [N, L, Dc], pooled [N, Dp])} from the
    cache, generating (and caching, one atomic shard at a time) whatever is missing. With several
    processes each generates its share of the missing shards; then every rank reads them all."""
    settings = data_settings(cfg, pipe, describe)
    folder = os.path.join(cfg.data_dir, hashlib.sha1(json.dumps(settings, sort_keys=True)
                                                     .encode()).hexdigest()[:16])
    os.makedirs(folder, exist_ok=True)
    if world.main:
        weights.atomic_write(os.path.join(folder, "settings.json"),
                             lambda f: f.write(json.dumps(settings, indent=1).encode()))
    per_size = max(1, cfg.data_size // len(pipe.sizes))
    shards = [(os.path.join(folder, f"{w}x{h}_{start // SHARD:04d}.safetensors"), (w, h),
               list(range(k * per_size + start, k * per_size + min(start + SHARD, per_size))))
              for k, (w, h) in enumerate(pipe.sizes) for start in range(0, per_size, SHARD)]
    missing = [s for s in shards if not os.path.isfile(s[0])]
    for path, (w, h), index in tqdm(missing[world.rank::world.size], desc=f"{cfg.data} data",
                                    unit="shard", dynamic_ncols=True, disable=not world.main):
        _write_shard(cfg, pipe, take, index, w, h, path, settings)
    world.barrier()
    dataset = {}
    for path, size, _ in shards:
        shard = weights.load_file(path)
        dataset.setdefault(size, []).append({k: v.float() for k, v in shard.items()})
    made = sum(len(index) for _, _, index in missing)
    print(f"data: {per_size * len(pipe.sizes)} {cfg.data} latents in {folder} "
          f"({made} generated now, {per_size * len(pipe.sizes) - made} from the cache)")
    keys = ("latents", "context", "pooled") + (("extra",) if cfg.task == "inpaint" else ())
    return {size: tuple(torch.cat([p[k] for p in parts]) for k in keys)
            for size, parts in dataset.items()}


def _write_shard(cfg, pipe, take, index, w, h, path, settings):
    cond, captions = take(index)
    tensors = {}
    if cfg.task == "inpaint":  # world renders, a random mask each; x0: the teacher's completion
        images = shapes.render_batch(captions, w, h, seed=index[0])            # [n, 3, H, W]
        rng = np.random.default_rng([cfg.seed, index[0], 2])
        masks = torch.stack([inpaint.random_mask(im, rng) for im in images])   # [n, 1, H, W]
        with torch.no_grad():
            z0 = pipe.vae.encode(images.to(pipe.device, pipe.dtype)).float().cpu()  # [n, C, h, w]
        m = inpaint.latent_mask(masks, pipe.vae.config.factor)                 # [n, 1, h, w]
        latents = z0 if cfg.data == "real" else inpaint.inpaint_latents(
            pipe, z0, m, cond, [10_000_000 + i for i in index], settings["steps"], settings["cfg"])
        tensors["extra"] = inpaint.known_channels(z0, m).half()                # [n, 1 + C, h, w]
    elif cfg.data == "synthetic":  # the teacher's own guided samples, from seeds no student sees
        latents = generate(pipe, cond, w, h, steps=settings["steps"], cfg=settings["cfg"],
                           seed=10_000_000 + index[0], batch_size=len(index), progress=False,
                           decode=False)                                       # [n, C, h, w]
    else:  # real: rendered images of the captions, through the VAE
        if not is_shapes(pipe):
            raise ValueError("--data real exists for the shapes world only (it renders captions)")
        images = shapes.render_batch(captions, w, h, seed=index[0])            # [n, 3, H, W]
        with torch.no_grad():
            latents = pipe.vae.encode(images.to(pipe.device, pipe.dtype)).float().cpu()
    weights.save_file({"latents": latents.half(), "context": cond.context.half(),
                       "pooled": cond.pooled.half(), **tensors}, path,
                      {"captions": json.dumps(captions), "settings": json.dumps(settings)})


def sample_batch(dataset, batch_size, generator):
    """One aspect-ratio bucket, then distinct random rows of it (on the CPU): latents, context,
    pooled (and an inpainting task's extra channels)."""
    sizes = sorted(dataset)
    bucket = dataset[sizes[int(torch.randint(len(sizes), (1,), generator=generator))]]
    rows = torch.randperm(len(bucket[0]), generator=generator)[:batch_size]
    return tuple(x[rows] for x in bucket)


# ----------------------------------------------------------------------------------------------
# outputs


def student_metadata(cfg, teacher_pipe, step, extra=None):
    """What sample.py needs: the teacher's text encoder, this run's VAE copy, the student's
    sampler (its training times, no guidance) and sizes."""
    meta = {
        "vae": "vae.safetensors",
        "sampler": json.dumps({"times": parse_list(cfg.times, "times"), "cfg": 1.0,
                               "sampler": cfg.sampler}),
        "sizes": json.dumps([list(s) for s in teacher_pipe.sizes]),
        "teacher": os.path.abspath(teacher_pipe.path),
        "train_steps": str(step),
        "command": "python train_ladd.py " + " ".join(sys.argv[1:]),
        "train_config": json.dumps(asdict(cfg)),
    }
    meta["text_encoder"] = json.dumps(text_encoder_spec(teacher_pipe))
    meta.update(extra or {})
    return meta


def text_encoder_spec(teacher_pipe):
    """The teacher's text encoder, named so that the student finds it from its own folder: the
    shapes encoder as it is; SD3 encoders by the absolute paths of the files that hold them."""
    spec = json.loads(teacher_pipe.metadata.get("text_encoder", '{"name": "sd3"}'))
    if spec.get("name") != "sd3" or isinstance(teacher_pipe.text_encoder, UnavailableTextEncoder):
        return spec
    path = os.path.abspath(teacher_pipe.path)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    for key in ("file", "t5_vocab", "clip_vocab"):
        if spec.get(key):
            spec[key] = os.path.join(folder, spec[key])
    return {**spec, "file": spec.get("file", path)}


def comparison_grid(teacher_pipe, student_pipe, grid, path, cache):
    """Rows: teacher at its default (guided) steps | teacher 4 steps | student 4 | student 1;
    the same prompts and seeds in every column. The teacher rows are computed once (cache).
    grid: (Conditioning, captions), or for inpainting a list of inpaint.edit_task edits (then
    a first row shows the input with its mask)."""
    w, h = teacher_pipe.sizes[0]
    d = teacher_pipe.defaults
    if isinstance(grid, list):  # edits: (image, mask, caption) each
        def run(pipe, steps=None):
            return torch.cat([inpaint.inpaint(pipe, image, mask, [caption], steps=steps, seed=i)
                              for i, (image, mask, caption) in enumerate(grid)])
    else:
        def run(pipe, steps=None):
            return generate(pipe, grid[0], w, h, steps=steps, seed=0, progress=False)
    if not cache:
        if isinstance(grid, list):
            cache["input, mask grey"] = torch.stack([torch.where(m > 0, 0.0, im)
                                                     for im, m, _ in grid])
        cache[f"teacher {d['steps']} steps, cfg {d['cfg']:g}"] = run(teacher_pipe)
        cache[f"teacher 4 steps, cfg {d['cfg']:g}"] = run(teacher_pipe, 4)
    rows = dict(cache)
    rows["student 4 steps"] = run(student_pipe, 4)
    rows["student 1 step"] = run(student_pipe, 1)
    if path:  # no path: this rank helps a sharded student sample, rank 0 writes
        save_strip(list(rows.values()), path, labels=list(rows))


# ----------------------------------------------------------------------------------------------
# memory


def tensor_bytes(tensors):
    """Bytes held by this process (an FSDP tensor: its local shard)."""
    tensors = [t.to_local() if hasattr(t, "to_local") else t for t in tensors if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


def rss_peak_bytes():
    """This process's peak resident memory."""
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def memory_report(teacher, student, ema, disc, opt_g, opt_d, device, shards=1):
    """(rows, text): each component's bytes estimated from its parameter count and the dtype plan
    (teacher in its dtype; student, its gradients, AdamW's two moments and the EMA in fp32;
    heads the same) next to the bytes its tensors really hold after a step; then the measured
    peak: on CUDA the allocator's since the last reset (weights + activations and temporaries),
    elsewhere the process's peak resident memory (also data, libraries, the interpreter).
    shards: the student's parts are split over this many FSDP processes; the rows are per rank."""
    n_t, n_s, n_d = (mmdit.count_params(m) for m in (teacher, student, disc))
    n_s //= shards
    moments = [v for opt in (opt_g,) for state in opt.state.values() for v in state.values()
               if torch.is_tensor(v) and v.dim()]
    heads = [*disc.parameters(), *(p.grad for p in disc.parameters()),
             *(v for state in opt_d.state.values() for v in state.values()
               if torch.is_tensor(v) and v.dim())]
    tb = next(teacher.parameters()).element_size()
    mb = torch.empty((), dtype=DTYPES[opt_g.defaults.get("state_dtype", "fp32")]).element_size()
    rows = [("teacher weights (frozen)", n_t * tb, tensor_bytes(teacher.parameters())),
            ("student weights (fp32 master)", 4 * n_s, tensor_bytes(student.parameters())),
            ("student gradients", 4 * n_s, tensor_bytes(p.grad for p in student.parameters())),
            ("student AdamW moments", 2 * mb * n_s, tensor_bytes(moments)),
            ("student EMA", 4 * n_s, tensor_bytes(ema.parameters())),
            ("heads: weights, gradients, AdamW", 16 * n_d, tensor_bytes(heads))]
    rows.append(("held in all", sum(r[1] for r in rows), sum(r[2] for r in rows)))
    if device.type == "cuda":
        rows.append(("peak allocated (+ activations)", None, torch.cuda.max_memory_allocated(device)))
    else:
        rows.append(("process peak RSS (+ activations, data)", None, rss_peak_bytes()))
    gib = lambda n: "-" if n is None else f"{n / 2 ** 30:.3f}"  # noqa: E731
    lines = [f"memory on {device} after one step (GiB): estimated | measured"]
    lines += [f"  {name:<40} {gib(est):>9} | {gib(real):>9}" for name, est, real in rows]
    return rows, "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# the run


def check_config(cfg):
    if cfg.task not in SHIPPED:
        raise ValueError(f"--task {cfg.task!r}: choose one of {', '.join(SHIPPED)}")
    if cfg.data not in ("synthetic", "real"):
        raise ValueError(f"--data {cfg.data!r}: choose synthetic or real")
    if cfg.checkpointing not in ("auto", "on", "off"):
        raise ValueError(f"--checkpointing {cfg.checkpointing!r}: choose auto, on or off")
    if cfg.sampler not in flow.SAMPLERS:
        raise ValueError(f"--sampler {cfg.sampler!r}: choose one of {', '.join(flow.SAMPLERS)}")
    times, probs = parse_list(cfg.times, "times"), parse_list(cfg.time_probs, "time-probs")
    warm = parse_list(cfg.warmup_probs, "warmup-probs")
    if not all(0 < t <= 1 for t in times) or times[0] != 1:
        raise ValueError(f"--times {cfg.times}: want decreasing times in (0, 1] starting at 1")
    for name, p in (("time-probs", probs), ("warmup-probs", warm)):
        if len(p) != len(times) or min(p) < 0 or sum(p) <= 0:
            raise ValueError(f"--{name} {','.join(map(str, p))}: want {len(times)} non-negative "
                             f"weights, one per --times value")
    if cfg.optim_dtype not in ("fp32", "bf16"):
        raise ValueError(f"--optim-dtype {cfg.optim_dtype!r}: choose fp32 or bf16")
    if cfg.batch_size < 1 or cfg.data_size < 1 or cfg.steps < 0:
        raise ValueError("--batch-size and --data-size must be >= 1 and --steps >= 0")


def train(cfg):
    started = time.time()
    check_config(cfg)
    if not cfg.teacher:  # the shipped shapes teacher of the task
        cfg = dataclasses.replace(cfg, teacher=os.path.join("assets", SHIPPED[cfg.task]))
    world, device = init_world(cfg.device, cfg.batch_size)  # torchrun: N processes, DDP; else one
    amp = pick_dtype(cfg.dtype, device)
    checkpointing = cfg.checkpointing == "on" or (cfg.checkpointing == "auto" and device.type == "cuda")

    # everything that can be wrong with the input fails here, before any work
    teacher_pipe = load_teacher(cfg, device, amp)
    teacher = teacher_pipe.model.requires_grad_(False)
    describe, take = prompt_source(cfg, teacher_pipe)
    student = make_student(cfg, teacher).to(device)
    disc = Discriminator.for_teacher(teacher.config, cfg.disc_blocks, cfg.disc_hidden).to(device)
    times, probs = parse_list(cfg.times, "times"), parse_list(cfg.time_probs, "time-probs")
    warm = parse_list(cfg.warmup_probs, "warmup-probs")
    student.gradient_checkpointing = teacher.gradient_checkpointing = checkpointing
    if cfg.compile:
        student.compile_blocks()
        teacher.compile_blocks()

    os.makedirs(cfg.out, exist_ok=True)
    if world.main:
        weights.atomic_write(os.path.join(cfg.out, "config.json"),
                             lambda f: f.write(json.dumps(asdict(cfg), indent=1).encode()))
        teacher_pipe.vae.save_pretrained(os.path.join(cfg.out, "vae.safetensors"))
    dataset = build_dataset(cfg, teacher_pipe, describe, take, world)
    data_minutes = (time.time() - started) / 60
    distill = None
    if cfg.distill_weight:
        u = take([0])[0]  # its uncond_* are the empty prompt's
        distill = (cfg.distill_weight, u.uncond_context.to(device), u.uncond_pooled.to(device),
                   teacher_pipe.defaults["cfg"])

    ema = mmdit.MMDiT(student.config).to(device).requires_grad_(False)
    ema.load_state_dict(student.state_dict())
    # several processes: DDP, or FSDP (in place) for student and EMA; optimizers come after
    sharded = cfg.shard and world.size > 1
    trained_student, trained_disc = world.wrap(student, device, sharded), world.wrap(disc, device)
    if sharded:
        world.wrap(ema, device, shard=True)
    opt_g = make_optimizer(student.parameters(), cfg.lr, (0.9, 0.99), device, cfg.optim_dtype)
    opt_d = make_optimizer(disc.parameters(), cfg.disc_lr, (0.0, 0.99), device)  # heads: fp32
    state_path = os.path.join(cfg.out, "state.safetensors")
    start, skipped = 0, {"g": 0, "d": 0}
    if cfg.resume and os.path.isfile(state_path):
        state = weights.load_state(state_path)
        world.load(student, state["student"])
        world.load(ema, state["ema"])
        world.load(student, state["opt_g"], opt_g)
        disc.load_state_dict(state["disc"])
        opt_d.load_state_dict(state["opt_d"])
        start, skipped = state["step"], state["skipped"]
        print(f"resumed {cfg.out} at step {start}")
    student_pipe = Pipeline(model=ema, text_encoder=teacher_pipe.text_encoder, vae=teacher_pipe.vae,
                            defaults={"times": times, "steps": len(times), "cfg": 1.0,
                                      "sampler": cfg.sampler},
                            sizes=teacher_pipe.sizes, path=cfg.out)
    grid, grid_cache = take(list(range(10_000_000, 10_000_006))), {}  # fixed, outside the data
    if cfg.task == "inpaint":  # six fixed edits instead
        w, h = teacher_pipe.sizes[0]
        grid = [inpaint.edit_task(np.random.default_rng([99, i]), w, h) for i in range(6)]
    print(f"student {mmdit.count_params(student) / 1e6:.2f}M, teacher "
          f"{mmdit.count_params(teacher) / 1e6:.2f}M, {len(disc.blocks)} heads "
          f"{mmdit.count_params(disc) / 1e6:.2f}M; {cfg.steps} steps of {cfg.batch_size} on "
          f"{device} ({amp}) x {world.size} process(es){' (FSDP)' * sharded}")
    logf = open(os.path.join(cfg.out, "log.jsonl"), "a") if world.main else None

    def save(step, extra=None):
        """Weights first, then the state that points past them; each file written atomically
        by rank 0 (with FSDP every rank takes part: the shards are gathered)."""
        if not (world.main or sharded):
            return
        tree = {"student": world.state(student), "ema": world.state(ema), "disc": disc.state_dict(),
                "opt_g": world.state(student, opt_g), "opt_d": opt_d.state_dict(), "step": step,
                "skipped": skipped}
        if world.main:
            meta = student_metadata(cfg, teacher_pipe, step, extra)
            ema.save_pretrained(os.path.join(cfg.out, "model.safetensors"), meta, tree["ema"])
            student.save_pretrained(os.path.join(cfg.out, "student.safetensors"), meta,
                                    tree["student"])
            weights.save_state(tree, state_path)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0, seen, step = time.time(), 0, start
    bar = tqdm(range(start, cfg.steps), desc="ladd", initial=start, total=cfg.steps,
               dynamic_ncols=True, disable=not world.main)
    for step in bar:
        # the global batch and all its random draws, the same on every rank (see World)
        g = step_generator(cfg.seed, step, torch.device("cpu"))
        x0, context, pooled, *extra = sample_batch(dataset, cfg.batch_size, g)   # [B, C, h, w] ...
        B = x0.shape[0]
        t = student_times(B, step, times, probs, warm, cfg.warmup, g)            # [B]
        t_hat = flow.sample_t_logit_normal(B, cfg.t_hat_mean, cfg.t_hat_std, g)  # [B]
        noise = {k: world.rows(torch.randn(x0.shape, generator=g)).to(device)    # [B / N, C, h, w]
                 for k in ("eps", "eps_fake", "eps_real")}
        batch = [world.rows(x).to(device) for x in (x0, context, pooled, t, t_hat)]  # this rank's rows
        extra = world.rows(extra[0]).to(device) if extra else None  # inpainting: mask, known latent
        fake_features, stats = generator_step(trained_student, teacher, disc, opt_g, batch, noise,
                                              amp, cfg.grad_clip, distill, world, extra)
        stats.update(discriminator_step(teacher, trained_disc, opt_d, batch, fake_features, noise,
                                        amp, cfg.grad_clip, cfg.r1_weight, g, world, extra))
        skipped["g"] += stats.pop("g_skipped")
        skipped["d"] += stats.pop("d_skipped")
        ema_update(ema, student, min(cfg.ema, (1 + step) / (10 + step)))
        if cfg.memory_report and step == start and world.main:
            tqdm.write(memory_report(teacher, student, ema, disc, opt_g, opt_d, device,
                                     world.size if sharded else 1)[1])
        seen += B
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            stats = world.mean(stats)
            rate = seen / (time.time() - t0)
            if logf:
                logf.write(json.dumps({"step": step, **{k: round(v, 5) for k, v in stats.items()},
                                       "skipped_g": skipped["g"], "skipped_d": skipped["d"],
                                       "size": list(x0.shape[-2:]),
                                       "samples_per_s": round(rate, 2)}) + "\n")
                logf.flush()
            bar.set_postfix(d=f"{stats['d_loss']:.2f}", g=f"{stats['g_loss']:.2f}",
                            real=f"{stats['logit_real']:.2f}", fake=f"{stats['logit_fake']:.2f}",
                            refresh=False)
        if cfg.grid_every and step % cfg.grid_every == 0 and (world.main or sharded):
            comparison_grid(teacher_pipe, student_pipe, grid, world.main and
                            os.path.join(cfg.out, f"grid_{step:06d}.png"), grid_cache)
        if cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0:
            save(step + 1)
        if cfg.max_minutes and not world.all_true(time.time() - t0 <= 60 * cfg.max_minutes):
            print(f"stopping after {cfg.max_minutes} minutes at step {step + 1}")
            break
    step = step + 1 if cfg.steps > start else start
    save(step)
    extra = {"data_minutes": f"{data_minutes:.1f}", "train_minutes": f"{(time.time() - t0) / 60:.1f}",
             "skipped_steps": json.dumps(skipped)}
    # rank 0 draws and judges (the weights are the same on every rank); a sharded EMA needs all
    if world.main or sharded:
        comparison_grid(teacher_pipe, student_pipe, grid,
                        world.main and os.path.join(cfg.out, "grid.png"), grid_cache)
        if cfg.judge_n and is_shapes(teacher_pipe):
            if cfg.task == "inpaint":
                scores = inpaint.evaluate_edits(student_pipe, cfg.judge_n, progress=world.main)
            else:
                from evaluate import judge_pipeline
                scores = judge_pipeline(student_pipe, cfg.judge_n, seed=1234, progress=world.main)
            print(f"student, 4 steps, {'edits ' * (cfg.task == 'inpaint')}judged:",
                  json.dumps(scores))
            extra["judge"] = json.dumps(scores)
            if logf:
                logf.write(json.dumps({"step": step, "judge": scores}) + "\n")
    if logf:
        logf.close()
    save(step, extra)
    print(f"student: {os.path.join(cfg.out, 'model.safetensors')} (grid: {cfg.out}/grid.png; "
          f"skipped steps: {skipped}); {(time.time() - started) / 60:.1f} min in all, "
          f"{data_minutes:.1f} of them for data")
    return student_pipe


def parse_args(argv=None):
    return parse_given(Config, PRESETS, argv, __doc__)


def main(argv=None):
    return run_cli(parse_args, lambda given: train(resolve_config(Config, PRESETS, given,
                                                                  "train_ladd.py")), argv)


if __name__ == "__main__":
    main()

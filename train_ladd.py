"""
Latent Adversarial Diffusion Distillation: a many-step, guided teacher becomes a few-step,
unguided student.

    python train_ladd.py                          # the shipped shapes teacher -> a 4-step student
    python train_ladd.py --resume runs/ladd       # continue a stopped run exactly
    python train_ladd.py --teacher sd3_medium.safetensors --cond cond.safetensors --out runs/sd3

One step (docs/ladd.md has the details and the measured choices):
  data     x0 = a latent the teacher generated itself (guided, many steps), with its prompt
  student  t in {1, .75, .5, .25}; x_t = (1 - t) x0 + t eps; x0_hat = x_t - t student(x_t, t)
  re-noise t_hat ~ logit-normal(0, 2); fake = noised x0_hat, real = noised x0 (same t_hat)
  judge    the frozen teacher runs on both; a small head per block reads its image tokens
  losses   heads: hinge (real up, fake down); student: -logit(fake), back-propagated
           through the frozen teacher into the student
  pairs    half the t = 1 rows start from the very noise the teacher turned into their x0, so
           x0 is their answer: + 30 |x0_hat - x0|^2 on those rows
The student starts as a copy of the teacher, never sees guidance, and samples in 4 steps.

Everything random in a step (batch, times, noises) is drawn from a generator seeded by
(seed, step), so `--resume` continues exactly where an interrupted run stopped. The synthetic
dataset is generated once and cached under --data-dir, shared by all runs with the same settings.
"""

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import cli
import flow
import images
import inpainting
import ladd_data
import lora
import metrics
import mmdit
import pipeline
import training
import weights
from discriminator import Discriminator, approx_r1, hinge_d_loss, hinge_g_loss


@dataclass
class Config:
    out: str = "runs/ladd"             # run folder: student, state, log.jsonl, comparison grids
    resume: str = ""                   # a run folder to continue (its saved settings)
    overwrite: bool = False            # start again in an --out that holds a run (replaces it)
    preset: str = "default"            # default | long (twice the steps, pairs in the first half) | test
    teacher: str = ""                  # MMDiT checkpoint file or run folder ("": the shipped one)
    task: str = "t2i"                  # t2i | inpaint (an inpainting teacher; shapes world)
    student_config: str = ""           # mmdit.CONFIGS name of a different student ("": the teacher's)
    lora: int = 0                      # LoRA rank: train adapters on the shared teacher (0: all weights)
    lora_alpha: float = 0.0            # adapters scaled by alpha / rank (0: alpha = rank)
    lora_targets: str = "attn"         # layers with adapters: attn, mlp, mod (comma-separated)
    prompts: str = ""                  # prompts file, one a line ("": random shapes-world captions)
    cond: str = ""                     # precomputed conditioning file or shard folder, not prompts
    seed: int = 0                      # data, noise, heads and student init all derive from it
    device: str = "auto"               # auto: cuda, then mps, then cpu
    dtype: str = "auto"                # autocast dtype: auto = bf16 on CUDA, fp32 elsewhere
    # data
    data: str = "synthetic"            # synthetic: teacher latents | real: world renders via the VAE
    data_size: int = 576               # latents in the dataset, split evenly over the sizes
    data_sizes: str = ""               # its aspect-ratio buckets, e.g. many or 64x64,112x48 ("": the teacher's)
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
    pair_weight: float = 30.0          # weight of |x0_hat - x0|^2 on rows that start from x0's own noise
    pair_share: float = 0.5            # ... the share of t = 1 rows that do (synthetic data only)
    pair_steps: int = 0                # the pairs only in the first this many steps (0: every step)
    grad_clip: float = 1.0             # clip both gradients to this norm
    ema: float = 0.995                 # EMA decay of the student used for sampling ...
    ema_warmup: int = 10               # ... ramped: min(ema, (1 + s) / (ema_warmup + s)) at step s
    sampler: str = "renoise"           # the student's sampler stored in its checkpoint
    checkpointing: str = "auto"        # gradient checkpointing: auto (on CUDA) | on | off
    compile: bool = False              # torch.compile the student's and teacher's blocks
    shard: bool = False                # under torchrun: FSDP-shard student, EMA, AdamW (8B models)
    # bookkeeping
    log_every: int = 10                # a log.jsonl line every this many steps
    grid_every: int = 200              # comparison grid every this many steps (0: only at the end)
    ckpt_every: int = 200              # resumable state every this many steps
    judge_n: int = 256                 # shapes world: captions judged at the end (0: skip)
    judge_sizes: str = ""              # ... at these sizes, e.g. unseen or 64x64,128x48 ("": trained)
    max_minutes: float = 0.0           # stop after this wall time (0: no limit)
    memory_report: bool = False        # print estimated and measured memory per component


# options newer than some saved runs: the value that reproduces a run saved without them
OLDER_RUNS = {"pair_weight": 0.0}
# options a resumed run may change; every other one must equal the run's saved config
MAY_CHANGE = ("steps", "pair_steps", "max_minutes", "log_every", "grid_every", "ckpt_every", "judge_n",
              "judge_sizes", "memory_report", "data_dir", "device", "compile", "checkpointing")

PRESETS = {
    "default": {},
    "long": dict(steps=3200, pair_steps=1600),  # 25 min on 2 CPU cores: 0.02 below the teacher
    "test": dict(data_size=8, steps=4, batch_size=4, warmup=1, log_every=1, grid_every=0,
                 ckpt_every=2, judge_n=4),
}


# ----------------------------------------------------------------------------------------------
# the algorithm: one step of each player


@dataclass
class Batch:
    """One step's data and random draws: this rank's rows of the global batch (training.World)."""
    x0: torch.Tensor                 # [B, C, h, w] the teacher's own samples: the "real" data
    context: torch.Tensor            # [B, L, Dc] their prompts' text tokens
    pooled: torch.Tensor             # [B, Dp] and pooled text vectors
    t: torch.Tensor                  # [B] the student's times
    t_hat: torch.Tensor              # [B] the re-noising level the heads judge at
    eps: torch.Tensor                # [B, C, h, w] noise of the student's input
    eps_fake: torch.Tensor           # [B, C, h, w] re-noises the student's x0_hat
    eps_real: torch.Tensor           # [B, C, h, w] re-noises x0
    known: torch.Tensor = None       # inpainting only: mask and known latent [B, 1 + C, h, w]
    paired: torch.Tensor = None      # [B] bool: eps is the noise the teacher turned into x0
    generator: torch.Generator = None  # the step's generator, for draws inside a step (R1)

    def input(self, x):
        """What student and teacher read: x (text-to-image), or x with the known channels."""
        return inpainting.with_known(x, self.known)


@dataclass
class Distill:
    """ADD's distillation loss (LADD drops it): weight * |x0_hat - the guided teacher's x0|^2."""
    weight: float
    uncond_context: torch.Tensor     # [1, L, Dc] the empty prompt's, for the teacher's CFG
    uncond_pooled: torch.Tensor      # [1, Dp]
    cfg: float                       # the teacher's guidance scale


@dataclass
class StepSettings:
    """How both steps run: precision and clipping, and the side features the plain LADD step
    does without (several processes, a distillation loss, an R1 penalty on the heads)."""
    amp: torch.dtype = torch.float32   # autocast dtype (fp32: none)
    grad_clip: float = 1.0             # both gradients clipped to this norm
    world: training.World = field(default_factory=training.World)  # torchrun's processes
    distill: Distill = None            # None: LADD
    r1_weight: float = 0.0             # 0: no R1
    pair_weight: float = 0.0           # 0: no regression onto the teacher's noise -> x0 pairs


def student_times(n, step, times, probs, warmup_probs, warmup, generator):
    """The student's training timesteps [n]: drawn from `times` with `warmup_probs` for the first
    `warmup` steps (low noise only: the student first learns to finish images), then `probs`."""
    p = torch.tensor(warmup_probs if step < warmup else probs, dtype=torch.float)
    index = torch.multinomial(p, n, replacement=True, generator=generator)
    return torch.tensor(times, dtype=torch.float)[index]                   # [n]


def generator_step(student, teacher, disc, opt, batch, run=StepSettings()):
    """One student update. Returns the teacher's features of the fake batch (detached: the
    heads' step judges them next) and statistics.

    The teacher's parameters are frozen, but the fake features are computed with autograd on,
    so the heads' verdict flows back through the teacher into the student. The heads are only
    judges here: their parameters are frozen for this step (no gradient is computed for them)."""
    b = batch
    disc.requires_grad_(False)
    with training.autocast(b.x0.device, run.amp):
        x_t = flow.add_noise(b.x0, b.eps, b.t)                                     # [B, C, H, W]
        v = student(b.input(x_t), b.t, b.context, b.pooled).float()
        x0_hat = flow.x0_from_v(x_t, v, b.t)                                       # [B, C, H, W]
        fake = flow.add_noise(x0_hat, b.eps_fake, b.t_hat)                        # [B, C, H, W]
        features = teacher.features(b.input(fake), b.t_hat, b.context, b.pooled,
                                    disc.blocks)                                   # [B, D, h, w] each
        logits = disc([f.float() for f in features], b.t_hat, b.pooled)           # [B] each
        loss = hinge_g_loss(logits)
        stats = {"g_loss": loss.item()}
        if run.pair_weight:
            pairs = pair_loss(x0_hat, b.x0, b.paired)
            loss = loss + run.pair_weight * pairs
            stats["pair_loss"] = pairs.item()
        if run.distill is not None:
            distill_loss = distillation_loss(teacher, x0_hat, fake, b, run.distill)
            loss = loss + run.distill.weight * distill_loss
            stats["distill_loss"] = distill_loss.item()
    stats["g_grad_norm"], stats["g_skipped"] = training.update(
        opt, loss, student.parameters(), run.grad_clip, run.world)
    disc.requires_grad_(True)
    return [f.detach().float() for f in features], stats


def discriminator_step(teacher, disc, opt, batch, fake_features, run=StepSettings()):
    """One heads update: real = x0 noised to t_hat with fresh noise, judged through the teacher
    without autograd; fake = the generator step's features of the student's x0_hat at the same
    t_hat (reused: the teacher is not run twice on the same input). `disc` may be DDP-wrapped."""
    b, B = batch, batch.x0.shape[0]
    blocks = getattr(disc, "module", disc).blocks
    with torch.no_grad(), training.autocast(b.x0.device, run.amp):
        real = flow.add_noise(b.x0, b.eps_real, b.t_hat)                          # [B, C, H, W]
        real_features = teacher.features(b.input(real), b.t_hat, b.context, b.pooled,
                                         blocks)                                   # [B, D, h, w] each
    features = [torch.cat([r.float(), f]) for r, f in zip(real_features, fake_features)]  # [2B, D, h, w]
    with training.autocast(b.x0.device, run.amp):
        logits = disc(features, b.t_hat.repeat(2), b.pooled.repeat(2, 1))         # [2B] each
        real_logits, fake_logits = [l[:B] for l in logits], [l[B:] for l in logits]
        loss = hinge_d_loss(real_logits, fake_logits)
        stats = {"d_loss": loss.item()}
        if run.r1_weight:
            r1 = approx_r1(disc, [f[:B] for f in features], b.t_hat, b.pooled,
                           generator=b.generator)
            loss = loss + run.r1_weight / 2 * r1
            stats["r1"] = r1.item()
    stats["d_grad_norm"], stats["d_skipped"] = training.update(
        opt, loss, disc.parameters(), run.grad_clip, run.world)
    stats["logit_real"] = torch.stack([l.mean() for l in real_logits]).mean().item()
    stats["logit_fake"] = torch.stack([l.mean() for l in fake_logits]).mean().item()
    return stats


def pair_loss(x0_hat, x0, paired):
    """The paired rows started from the noise the teacher turned into their x0, so x0 is the
    answer for them: their squared error, averaged over the batch (unpaired rows count 0)."""
    error = ((x0_hat - x0) ** 2).mean(dim=(1, 2, 3))                              # [B]
    return (error * paired).sum() / len(error)


def distillation_loss(teacher, x0_hat, fake, batch, distill):
    """ADD's extra term: pull x0_hat towards the guided teacher's denoising of `fake`."""
    with torch.no_grad():
        B = x0_hat.shape[0]
        judge = teacher if batch.known is None else inpainting.conditioned(teacher, batch.known)
        v = flow.cfg_velocity(judge, fake.detach(), batch.t_hat, batch.context, batch.pooled,
                              distill.uncond_context.expand(B, -1, -1),           # [B, L, Dc]
                              distill.uncond_pooled.expand(B, -1), distill.cfg).float()  # [B, Dp]
        target = flow.x0_from_v(fake.detach(), v, batch.t_hat)                    # [B, C, H, W]
    return F.mse_loss(x0_hat, target)


def draw_batch(cfg, dataset, schedule, step, world, device):
    """Step `step`'s global batch and all its random draws, made from one generator seeded by
    (seed, step) and so the same on every rank; this rank keeps its rows."""
    g = training.step_generator(cfg.seed, step)
    data = ladd_data.sample_batch(dataset, cfg.batch_size, g)
    x0 = data["latents"]                                                      # [B, C, h, w]
    B = x0.shape[0]
    t = student_times(B, step, *schedule, cfg.warmup, g)                      # [B]
    t_hat = flow.sample_t_logit_normal(B, cfg.t_hat_mean, cfg.t_hat_std, g)  # [B]
    noise = {k: torch.randn(x0.shape, generator=g) for k in ("eps", "eps_fake", "eps_real")}
    paired = torch.zeros(B, dtype=torch.bool)                                 # [B]
    pairs_now = cfg.pair_weight and (not cfg.pair_steps or step < cfg.pair_steps)  # --pair-steps
    if pairs_now:  # some t = 1 rows start from their latent's own noise: a known answer
        paired = (t == 1) & (torch.rand(B, generator=g) < cfg.pair_share)     # [B]
        if paired.any():
            noise["eps"][paired] = flow.seeded_noise(data["seed"][paired].tolist(), x0.shape[1:])
    noise = {k: world.rows(x).to(device) for k, x in noise.items()}          # [B / N, C, h, w]
    rows = [world.rows(x).to(device) for x in (x0, data["context"], data["pooled"], t, t_hat)]
    known = world.rows(data["extra"]).to(device) if "extra" in data else None
    return Batch(*rows, **noise, known=known, paired=world.rows(paired).to(device), generator=g)


# ----------------------------------------------------------------------------------------------
# models


def load_teacher(cfg, device, amp):
    """The teacher's pipeline (MMDiT, VAE, text encoder, sampling defaults), frozen. On CUDA it is
    stored in the autocast dtype: it is never updated, only run and differentiated through."""
    pipe = pipeline.load_pipeline(cfg.teacher, device, amp if device.type == "cuda" else torch.float32)
    inpainting.check_task(pipe, cfg.task, cfg.teacher)
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
    for name in ("in_channels", "out_channels", "context_dim", "pooled_dim", "patch_size"):
        if getattr(s, name) != getattr(t, name):
            raise ValueError(
                f"--student-config {cfg.student_config}: {name} is {getattr(s, name)} but the "
                f"teacher's is {getattr(t, name)}; student and teacher share latents and text "
                f"conditioning, so pick a config with {name}={getattr(t, name)}")
    if s.pos_embed_max_size < t.pos_embed_max_size:
        raise ValueError(f"--student-config {cfg.student_config}: its positional grid "
                         f"({s.pos_embed_max_size}) is smaller than the teacher's "
                         f"({t.pos_embed_max_size})")
    return s


def make_student(cfg, teacher):
    """A copy of the teacher (fp32 master weights), a smaller model initialised from it, or with
    --lora the teacher itself plus adapters (its tensors shared, only the adapters trained)."""
    if cfg.lora:
        torch.manual_seed(cfg.seed)
        return lora.add_adapters(teacher, cfg.lora, cfg.lora_alpha or None, cfg.lora_targets)
    config = student_config(cfg, teacher.config)
    torch.manual_seed(cfg.seed)
    student = mmdit.MMDiT(config)
    copied = mmdit.init_from(student, teacher)
    if config != teacher.config:
        print(f"student {cfg.student_config}: {copied} of {len(student.state_dict())} tensors "
              "initialised from the teacher")
    return student


def trained_state(model, world):
    """What a checkpoint keeps of the student (or its EMA): all weights, or a LoRA model's
    adapters (its base is the teacher file)."""
    return lora.adapter_state(model) if lora.is_lora(model) else world.state(model)


def load_trained(model, state, world):
    """The inverse of trained_state."""
    if lora.is_lora(model):
        return lora.load_adapter_state(model, state)
    return world.load(model, state)


# ----------------------------------------------------------------------------------------------
# outputs


def comparison_grid(teacher_pipe, student_pipe, grid, path, cache):
    """Rows: teacher at its default (guided) steps | teacher 4 steps | student 4 | student 1;
    the same prompts and seeds in every column. The teacher rows are computed once (cache).
    grid: (Conditioning, captions), or for inpainting a list of inpaint.edit_task edits (then
    a first row shows the input with its mask)."""
    w, h = teacher_pipe.sizes[0]
    d = teacher_pipe.defaults
    if isinstance(grid, list):  # edits: (image, mask, caption) each
        def run(pipe, steps=None):
            return torch.cat([inpainting.inpaint(pipe, image, mask, [caption], steps=steps, seed=i)
                              for i, (image, mask, caption) in enumerate(grid)])
    else:
        def run(pipe, steps=None):
            return pipeline.generate(pipe, grid[0], w, h, steps=steps, seed=0, progress=False)
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
        images.save_strip(list(rows.values()), path, labels=list(rows))


OPTION_RULES = {  # cli.check_options: each numeric option and what it allows
    "data_size": cli.AT_LEAST_1, "batch_size": cli.AT_LEAST_1, "disc_hidden": cli.AT_LEAST_1,
    "log_every": cli.AT_LEAST_1, "ema_warmup": cli.AT_LEAST_1, "steps": cli.COUNT,
    "warmup": cli.COUNT, "data_steps": cli.COUNT, "grid_every": cli.COUNT,
    "ckpt_every": cli.COUNT, "judge_n": cli.COUNT, "data_cfg": cli.NON_NEGATIVE,
    "lr": cli.POSITIVE, "disc_lr": cli.POSITIVE, "t_hat_std": cli.POSITIVE,
    "grad_clip": cli.POSITIVE, "t_hat_mean": cli.FINITE, "distill_weight": cli.NON_NEGATIVE,
    "r1_weight": cli.NON_NEGATIVE, "max_minutes": cli.NON_NEGATIVE, "ema": cli.DECAY,
    "lora": cli.COUNT, "lora_alpha": cli.NON_NEGATIVE, "pair_weight": cli.NON_NEGATIVE,
    "pair_share": cli.SHARE, "pair_steps": cli.COUNT}


def check_config(cfg):
    """Every option's value checked before any work -> the student's schedule (times, their
    probabilities, the warm-up's)."""
    choices = {"task": tuple(training.SHIPPED), "data": ("synthetic", "real"),
               "checkpointing": ("auto", "on", "off"), "sampler": tuple(flow.SAMPLERS),
               "optim_dtype": ("fp32", "bf16")}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(cfg, name)!r}: choose one of "
                             f"{', '.join(allowed)}")
    cli.check_options(cfg, OPTION_RULES)
    if cfg.lora:
        lora.parse_targets(cfg.lora_targets)
        for name in ("student_config", "shard"):
            if getattr(cfg, name):
                raise ValueError(f"--lora trains adapters on the teacher itself; it does not "
                                 f"combine with --{name.replace('_', '-')}")
    if cfg.pair_weight and cfg.data != "synthetic":
        raise ValueError(f"--pair-weight {cfg.pair_weight:g}: the pairs are the teacher's own "
                         f"noise -> latent samples, which --data {cfg.data} does not have; pass "
                         f"--pair-weight 0 with it")
    times, probs = cli.parse_list(cfg.times, "times"), cli.parse_list(cfg.time_probs, "time-probs")
    warm = cli.parse_list(cfg.warmup_probs, "warmup-probs")
    if times[0] != 1 or not all(a > b for a, b in zip(times, times[1:] + [0])):
        raise ValueError(f"--times {cfg.times}: want strictly decreasing times in (0, 1] starting "
                         f"at 1, e.g. 1,0.75,0.5,0.25")
    for name, p in (("time-probs", probs), ("warmup-probs", warm)):
        text = f"--{name} {','.join(map(str, p))}"
        if len(p) != len(times) or not all(math.isfinite(v) and v >= 0 for v in p):
            raise ValueError(f"{text}: want {len(times)} finite weights >= 0, one per --times value")
        if sum(p) <= 0:
            raise ValueError(f"{text}: the weights sum to 0; make at least one positive")
    return times, probs, warm


def check_sizes(cfg, pipe, name):
    """--data-sizes / --judge-sizes -> [(width, height), ...] (None: the teacher's), each checked
    against the teacher's patch, VAE factor and positional grid."""
    text, option = getattr(cfg, name), "--" + name.replace("_", "-")
    if not text:
        return None
    if cfg.task != "t2i":
        raise ValueError(f"{option}: inpainting uses the teacher's sizes; leave it out")
    sizes = metrics.parse_sizes(text, option)
    for w, h in sizes:
        try:
            pipeline.check_size(pipe, w, h)
        except ValueError as e:
            raise ValueError(f"{option} {text}: {e}") from None
    return sizes


def train(cfg):
    started = time.time()
    schedule = check_config(cfg)
    if not cfg.teacher:  # the shipped shapes teacher of the task
        cfg = dataclasses.replace(cfg, teacher=os.path.join("assets", training.SHIPPED[cfg.task]))
    world, device = training.init_world(cfg.device, cfg.batch_size)  # torchrun: N processes
    amp = cli.pick_dtype(cfg.dtype, device)
    checkpointing = cfg.checkpointing == "on" or (cfg.checkpointing == "auto" and device.type == "cuda")

    # everything that can be wrong with the input fails here, before any work
    teacher_pipe = load_teacher(cfg, device, amp)
    teacher = teacher_pipe.model.requires_grad_(False)
    judge_sizes = check_sizes(cfg, teacher_pipe, "judge_sizes")
    sizes = check_sizes(cfg, teacher_pipe, "data_sizes") or teacher_pipe.sizes  # the student's
    describe, take = ladd_data.prompt_source(cfg, teacher_pipe)
    student = make_student(cfg, teacher).to(device)
    disc = Discriminator.for_teacher(teacher.config, cfg.disc_blocks, cfg.disc_hidden).to(device)
    student.gradient_checkpointing = teacher.gradient_checkpointing = checkpointing
    if cfg.compile:
        student.compile_blocks()
        teacher.compile_blocks()

    run = StepSettings(amp, cfg.grad_clip, world, r1_weight=cfg.r1_weight, pair_weight=cfg.pair_weight)
    if cfg.distill_weight:
        u = take([0])[0]  # its uncond_* are the empty prompt's
        run.distill = Distill(cfg.distill_weight, u.uncond_context.to(device),
                              u.uncond_pooled.to(device), teacher_pipe.defaults["cfg"])

    ema = (make_student(cfg, teacher) if cfg.lora else  # a LoRA EMA shares the teacher's too
           mmdit.MMDiT(student.config).to(device)).requires_grad_(False)
    load_trained(ema, trained_state(student, world), world)
    # several processes: DDP, or FSDP (in place) for student and EMA; optimizers come after
    sharded = cfg.shard and world.size > 1
    trained_student, trained_disc = world.wrap(student, device, sharded), world.wrap(disc, device)
    if sharded:
        world.wrap(ema, device, shard=True)
    opt_g = training.make_optimizer([p for p in student.parameters() if p.requires_grad], cfg.lr,
                                    (0.9, 0.99), device, cfg.optim_dtype)
    opt_d = training.make_optimizer(disc.parameters(), cfg.disc_lr, (0.0, 0.99), device)  # fp32
    state_path = os.path.join(cfg.out, "state.safetensors")
    start, skipped = 0, {"g": 0, "d": 0}
    if cfg.resume:  # cli.resolve_config checked that the state is there
        state = weights.load_state(state_path)
        load_trained(student, state["student"], world)
        load_trained(ema, state["ema"], world)
        world.load(student, state["opt_g"], opt_g)
        disc.load_state_dict(state["disc"])
        opt_d.load_state_dict(state["opt_d"])
        start, skipped = state["step"], state["skipped"]
        print(f"resumed {cfg.out} at step {start}")
    if world.main:
        training.start_run(cfg)  # --overwrite clears the folder; config.json
        teacher_pipe.vae.save_pretrained(os.path.join(cfg.out, "vae.safetensors"))
    student_pipe = pipeline.Pipeline(
        model=ema, text_encoder=teacher_pipe.text_encoder, vae=teacher_pipe.vae,
        defaults={"times": schedule[0], "steps": len(schedule[0]), "cfg": 1.0,
                  "sampler": cfg.sampler}, sizes=sizes, path=cfg.out)
    grid, grid_cache = take(list(range(10_000_000, 10_000_006))), {}  # fixed, outside the data
    if cfg.task == "inpaint":  # six fixed edits instead
        w, h = teacher_pipe.sizes[0]
        grid = [inpainting.edit_task(np.random.default_rng([99, i]), w, h) for i in range(6)]
    trained = sum(p.numel() for p in student.parameters() if p.requires_grad)
    print(f"student {mmdit.count_params(student) / 1e6:.2f}M"
          f"{f' (LoRA rank {cfg.lora}: {trained / 1e6:.3f}M trained)' if cfg.lora else ''}, teacher "
          f"{mmdit.count_params(teacher) / 1e6:.2f}M, {len(disc.blocks)} heads "
          f"{mmdit.count_params(disc) / 1e6:.2f}M; {cfg.steps} steps of {cfg.batch_size} on "
          f"{device} ({amp}) x {world.size} process(es){' (FSDP)' * sharded}")
    ramp_ends = math.ceil((cfg.ema * cfg.ema_warmup - 1) / (1 - cfg.ema))
    if cfg.ema_warmup > 1 and ramp_ends > cfg.steps:
        print(f"EMA: decay ramps as (1 + s) / ({cfg.ema_warmup} + s), below --ema {cfg.ema} until "
              f"step {ramp_ends} (--ema-warmup 1: constant)")

    def save(step, **extra):
        """Weights first, then the state that points past them; each file written atomically
        by rank 0 (with FSDP every rank takes part: the shards are gathered)."""
        if not (world.main or sharded):
            return
        tree = {"student": trained_state(student, world), "ema": trained_state(ema, world),
                "disc": disc.state_dict(), "opt_g": world.state(student, opt_g),
                "opt_d": opt_d.state_dict(), "step": step, "skipped": skipped}
        if world.main:
            meta = training.checkpoint_metadata(
                "train_ladd.py", cfg, pipeline.text_encoder_spec(teacher_pipe), "vae.safetensors",
                {"times": schedule[0], "cfg": 1.0, "sampler": cfg.sampler}, sizes,
                teacher=os.path.abspath(teacher_pipe.path), train_steps=str(step), **extra)
            if cfg.lora:  # the EMA merged into the teacher's weights, and its adapters alone
                ema.save_pretrained(os.path.join(cfg.out, "model.safetensors"), meta,
                                    lora.merged_state(ema))
                lora.save_adapters(ema, os.path.join(cfg.out, "adapters.safetensors"), meta)
            else:
                ema.save_pretrained(os.path.join(cfg.out, "model.safetensors"), meta, tree["ema"])
                student.save_pretrained(os.path.join(cfg.out, "student.safetensors"), meta,
                                        tree["student"])
            weights.save_state(tree, state_path)

    try:  # generated once, then read from the cache (an interrupted generation continues)
        dataset = ladd_data.build_dataset(cfg, teacher_pipe, describe, take, sizes, world)
    except KeyboardInterrupt:
        if not os.path.isfile(state_path):
            save(start)
        raise training.interrupted("train_ladd.py", cfg.out, start) from None
    data_minutes = (time.time() - started) / 60
    logf = training.open_log(os.path.join(cfg.out, "log.jsonl"),
                             keep=lambda record: record["step"] < start) if world.main else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0, seen, step = time.time(), 0, start
    bar = tqdm(range(start, cfg.steps), desc="ladd", initial=start, total=cfg.steps,
               dynamic_ncols=True, disable=not world.main)
    with training.finish_step_on_interrupt() as interrupt:  # Ctrl-C: finish the step, save
        for step in bar:
            batch = draw_batch(cfg, dataset, schedule, step, world, device)
            fake_features, stats = generator_step(trained_student, teacher, disc, opt_g, batch, run)
            stats.update(discriminator_step(teacher, trained_disc, opt_d, batch, fake_features, run))
            skipped["g"] += stats.pop("g_skipped")
            skipped["d"] += stats.pop("d_skipped")
            training.ema_update(ema, student, min(cfg.ema, (1 + step) / (cfg.ema_warmup + step)))
            if cfg.memory_report and step == start and world.main:
                tqdm.write(training.memory_report(
                    teacher, student, ema, disc, opt_g, opt_d, device, world.size if sharded else 1,
                    teacher_dtype=amp if device.type == "cuda" else torch.float32)[1])  # load_teacher's
            seen += len(batch.x0) * world.size
            if step % cfg.log_every == 0 or step == cfg.steps - 1:
                stats = world.mean(stats)
                rate = seen / (time.time() - t0)
                if logf:
                    logf.write(json.dumps({"step": step, **{k: round(v, 5) for k, v in stats.items()},
                                           "skipped_g": skipped["g"], "skipped_d": skipped["d"],
                                           "size": list(batch.x0.shape[-2:]),
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
            if not world.all_true(not interrupt.requested):
                save(step + 1)
                raise training.interrupted("train_ladd.py", cfg.out, step + 1)
    step = step + 1 if cfg.steps > start else start
    save(step)
    extra = {"data_minutes": f"{data_minutes:.1f}", "train_minutes": f"{(time.time() - t0) / 60:.1f}",
             "skipped_steps": json.dumps(skipped)}
    # rank 0 draws and judges (the weights are the same on every rank); a sharded EMA needs all
    if world.main or sharded:
        comparison_grid(teacher_pipe, student_pipe, grid,
                        world.main and os.path.join(cfg.out, "grid.png"), grid_cache)
        if cfg.judge_n and pipeline.is_shapes(teacher_pipe):
            if cfg.task == "inpaint":
                scores = metrics.judge_edits(student_pipe, cfg.judge_n, progress=world.main)
            else:
                scores = metrics.judge_pipeline(student_pipe, cfg.judge_n, seed=1234,
                                                sizes=judge_sizes, progress=world.main)
            n = len(schedule[0])
            print(f"student, {n} steps, {'edits ' * (cfg.task == 'inpaint')}judged:",
                  json.dumps(scores))
            record = {"step": step, "judge": scores}
            if cfg.task == "t2i":  # the same student with fewer steps: times 1, .5 and 1
                record["judge_fewer_steps"] = {}
                for k in [k for k in (2, 1) if k < n]:
                    record["judge_fewer_steps"][k] = metrics.judge_pipeline(
                        student_pipe, cfg.judge_n, seed=1234, sizes=judge_sizes, steps=k)
                    print(f"student, {k} step{'s' * (k > 1)}, judged: all_correct "
                          f"{record['judge_fewer_steps'][k]['all_correct']}, purity "
                          f"{record['judge_fewer_steps'][k]['purity']}")
                extra["judge_fewer_steps"] = json.dumps(record["judge_fewer_steps"])
            extra["judge"] = json.dumps(scores)
            if logf:
                logf.write(json.dumps(record) + "\n")
    if logf:
        logf.close()
    save(step, **extra)
    print(f"student: {os.path.join(cfg.out, 'model.safetensors')} (grid: {cfg.out}/grid.png; "
          f"skipped steps: {skipped}); {(time.time() - started) / 60:.1f} min in all, "
          f"{data_minutes:.1f} of them for data")
    return student_pipe


def main(argv=None):
    return cli.training_main(Config, PRESETS, train, argv, "train_ladd.py", __doc__,
                             may_change=MAY_CHANGE, older_runs=OLDER_RUNS)


if __name__ == "__main__":
    main()

"""
Train the shapes world's teacher, in one command: first its tiny VAE, then the tiny MMDiT teacher
with rectified flow. This is what makes `assets/shapes_vae.safetensors` and
`assets/shapes_teacher.safetensors`, the models `python train_ladd.py` distils by default.

    python train_teacher.py                    # the recipe of the shipped weights (a GPU)
    python train_teacher.py --preset quick     # a few minutes on a laptop CPU
    python train_teacher.py --preset edit      # the editing teacher, from the shipped one (a GPU)
    python train_teacher.py --resume runs/teacher

Phase 1, the VAE: scenes rendered on the fly, L1 reconstruction + a small KL term; then the
latents' mean and standard deviation are measured and stored as its shift and scale, so the
teacher sees latents of unit variance.
Phase 2, the teacher: x_t = (1 - t) x0 + t eps with t ~ logit-normal, the MMDiT regresses the
velocity eps - x0; captions are dropped (replaced by "") 10 % of the time so classifier-free
guidance works; each batch is one aspect-ratio bucket; an EMA of the weights is what is saved.
Every step's data and noise are a pure function of (seed, step), so a resumed run continues
exactly where it stopped.

--task inpaint and --task edit fine-tune a text-to-image teacher (--init) into one that reads
extra input channels: the mask and the known latent (inpainting.py), or the source image's
latent (editing.py; the source is also dropped, replaced by a zero latent, for image guidance).
"""

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import cli
import editing
import flow
import inpainting
import metrics
import mmdit
import pipeline
import shapes
import training
import vae as vae_lib
import weights
from images import save_grid


@dataclass
class Config:
    out: str = "runs/teacher"          # run folder: checkpoints, log.jsonl, sample grids
    resume: str = ""                   # a run folder to continue (its saved settings)
    overwrite: bool = False            # start again in an --out that holds a run (replaces it)
    preset: str = "default"            # default, edit (a GPU) | quick, inpaint: CPU minutes | test: seconds
    seed: int = 0                      # data, noise and init all derive from it
    device: str = "auto"               # auto: cuda, then mps, then cpu
    dtype: str = "auto"                # autocast dtype: auto = bf16 on CUDA, fp32 elsewhere
    workers: int = -1                  # data-rendering processes; -1 = auto (0 on CPU)
    # phase 1: VAE
    vae: str = ""                      # use this VAE file instead of training one (skips phase 1)
    vae_config: str = "shapes"         # vae.CONFIGS name (x4, 4 latent channels)
    vae_steps: int = 3000              # VAE training steps
    vae_batch: int = 128               # rendered images per VAE step
    vae_lr: float = 1e-3               # VAE Adam, 100 warm-up steps, x0.1 for the last fifth
    kl_weight: float = 1e-6            # small: the latent is rescaled afterwards anyway
    vae_max_minutes: float = 0.0       # stop the VAE phase after this wall time (0: no limit)
    # phase 2: teacher
    task: str = "t2i"                  # t2i | inpaint (input: latent, mask, known latent) | edit (latent, source)
    init: str = ""                     # start from this teacher's weights (inpaint, edit: a t2i one)
    model_config: str = "shapes"       # mmdit.CONFIGS name
    steps: int = 7000                  # teacher training steps
    batch_size: int = 256              # images per teacher step, all of one size (aspect bucket)
    lr: float = 6e-4                   # AdamW, linear warm-up then constant
    warmup: int = 500                  # linear LR warm-up steps; EMA = weights until then
    weight_decay: float = 0.0          # AdamW's decoupled weight decay
    grad_clip: float = 1.0             # clip the gradient to this norm
    ema: float = 0.999                 # EMA decay of the saved weights
    caption_dropout: float = 0.1       # share of "" captions (unconditional, for CFG)
    image_dropout: float = 0.1         # --task edit: share of zero source latents (image guidance)
    t_mean: float = 0.0                # logit-normal(t_mean, t_std) training times (SD3's)
    t_std: float = 1.0                 # ... their spread
    max_minutes: float = 0.0           # stop the teacher phase after this wall time (0: no limit)
    compile: bool = False              # torch.compile the teacher's blocks
    # sampling defaults stored in the checkpoint (what sample.py uses)
    sample_steps: int = 28             # Euler steps
    sample_cfg: float = 4.0            # classifier-free guidance scale
    sample_shift: float = 1.0          # timestep shift of the sampling schedule (1: none)
    sample_image_cfg: float = 1.5      # --task edit: image guidance scale (editing.guided)
    # bookkeeping
    log_every: int = 50                # a log.jsonl line every this many steps
    sample_every: int = 2000           # preview grid (EMA weights, default sampler)
    ckpt_every: int = 1000             # resumable training state
    judge_n: int = 256                 # captions judged at the end (0: skip)
    export: str = ""                   # also write the fp16 shipped files (below) into this folder


# options a resumed run may change; every other one must equal the run's saved config
MAY_CHANGE = ("steps", "max_minutes", "log_every", "sample_every", "ckpt_every", "judge_n",
              "export", "workers", "device", "compile")

PRESETS = {
    "default": {},  # the recipe of the shipped weights (a GPU)
    # a teacher on the shipped VAE in a few minutes on a laptop CPU
    "quick": dict(vae="assets/shapes_vae.safetensors", steps=900, batch_size=32, lr=1e-3,
                  warmup=100, ema=0.99, sample_every=300, ckpt_every=300, judge_n=64,
                  log_every=25),
    # an inpainting teacher fine-tuned from the shipped one: a few CPU minutes
    "inpaint": dict(task="inpaint", init="assets/shapes_teacher.safetensors",
                    vae="assets/shapes_vae.safetensors", steps=600, batch_size=32, lr=2e-4,
                    warmup=50, ema=0.99, sample_every=0, ckpt_every=200, judge_n=128,
                    log_every=25),
    # the editing teacher fine-tuned from the shipped one: the recipe of the shipped weights (a GPU)
    "edit": dict(task="edit", init="assets/shapes_teacher.safetensors",
                 vae="assets/shapes_vae.safetensors", steps=3000, batch_size=256, lr=4e-4,
                 warmup=200, ema=0.998, sample_every=0, ckpt_every=500, judge_n=256),
    # seconds: the tests' tiny VAE and teacher
    "test": dict(vae_config="test", vae_steps=3, vae_batch=4, model_config="test", steps=4,
                 batch_size=4, warmup=1, sample_every=0, ckpt_every=2, judge_n=4, log_every=1,
                 sample_steps=2),
}

TEXT_ENCODER = {"name": "shapes", "dim": 64, "pooled_dim": 64, "seed": 0}


# ----------------------------------------------------------------------------------------------
# data


class SceneStream(torch.utils.data.IterableDataset):
    """shapes.batches (edit: editing.batches) from a given step on, split over worker processes
    in step order: (images, captions) (edit: (targets, instructions, sources))."""
    def __init__(self, batch_size, seed, start_step, edit=False):
        self.batch_size, self.seed, self.start, self.edit = batch_size, seed, start_step, edit

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, n = (info.id, info.num_workers) if info else (0, 1)
        # worker k renders steps start + k, start + k + n, ...; the loader interleaves them
        stream = editing.batches if self.edit else shapes.batches
        for *batch, _ in stream(self.batch_size, seed=self.seed, start_step=self.start + wid, stride=n):
            yield batch


def scene_loader(batch_size, seed, start_step, workers, edit=False):
    return iter(torch.utils.data.DataLoader(
        SceneStream(batch_size, seed, start_step, edit), batch_size=None, num_workers=workers,
        collate_fn=lambda b: b, prefetch_factor=4 if workers else None,
        persistent_workers=False))


# ----------------------------------------------------------------------------------------------
# phase 1: the VAE


def vae_loss(model, images, generator, kl_weight):
    moments = model.encoder(images)                                # [B, 2z, h, w]
    mean, logvar = moments.chunk(2, dim=1)
    logvar = logvar.clamp(-30, 20)
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    recon = model.decoder(mean + torch.exp(0.5 * logvar) * eps)    # [B, 3, H, W]
    kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).mean()
    return F.l1_loss(recon, images) + kl_weight * kl


def train_vae(cfg, device, amp, workers, log):
    torch.manual_seed(cfg.seed)
    model = vae_lib.VAE(cfg.vae_config).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.vae_lr)
    data = scene_loader(cfg.vae_batch, cfg.seed + 1, 0, workers)
    bar = tqdm(range(cfg.vae_steps), desc="vae", dynamic_ncols=True)
    t0 = time.time()
    for step in bar:
        images = next(data)[0].to(device)
        lr = cfg.vae_lr * min(1.0, (step + 1) / 100) * (0.1 if step > 0.8 * cfg.vae_steps else 1)
        for group in opt.param_groups:
            group["lr"] = lr
        with training.autocast(device, amp):
            loss = vae_loss(model, images, training.step_generator(cfg.seed, step, device), cfg.kl_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % cfg.log_every == 0:
            log({"phase": "vae", "step": step, "loss": loss.item()})
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if cfg.vae_max_minutes and time.time() - t0 > 60 * cfg.vae_max_minutes:
            print(f"vae: stopping after {cfg.vae_max_minutes} minutes at step {step + 1}")
            break
    # measure the latent statistics and store them as shift and scale
    model.eval()
    with torch.no_grad():
        probe = torch.cat([model.encoder(next(data)[0].to(device)).chunk(2, dim=1)[0].flatten()
                           for _ in range(8)])  # latent means of 8 batches, any sizes
    model.config.shift = probe.mean().item()
    model.config.scale = 1.0 / probe.std().item()
    return model


@torch.no_grad()
def judge_reconstructions(vae, n, seed, device):
    """The judge on VAE round trips of clean renders: the ceiling for any model on this latent."""
    rng = np.random.default_rng(seed)
    totals = {}
    for k, (w, h) in enumerate(shapes.SIZES.values()):
        captions = [shapes.random_caption(rng) for _ in range(n // len(shapes.SIZES))]
        images = shapes.render_batch(captions, w, h, seed=seed + k)
        recon = vae.decode(vae.encode(images.to(device))).float().cpu()
        for key, v in shapes.judge_batch(recon, captions).items():
            totals[key] = totals.get(key, 0) + v / len(shapes.SIZES)
    return {k: round(v, 4) for k, v in totals.items()}


# ----------------------------------------------------------------------------------------------
# phase 2: the teacher


def flow_loss(model, x0, context, pooled, generator, t_mean, t_std, world=training.World(),
              known=None):
    """Rectified flow: regress the velocity eps - x0 at a logit-normal time. x0 holds this
    rank's rows; times and noises are drawn for the global batch (training.World). known: an
    inpainting model's mask and known latent, read next to the noisy latent."""
    n = len(x0) * world.size
    t = world.rows(flow.sample_t_logit_normal(n, t_mean, t_std, generator, x0.device))  # [B]
    noise = world.rows(torch.randn((n, *x0.shape[1:]), generator=generator, device=x0.device))
    x_t = flow.add_noise(x0, noise, t)                                                 # [B, C, H, W]
    v = model(inpainting.with_known(x_t, known), t, context, pooled)
    return F.mse_loss(v.float(), flow.velocity_target(x0, noise))


def drop_captions(captions, p, generator):
    keep = torch.rand(len(captions), generator=generator, device=generator.device) >= p
    return [c if k else "" for c, k in zip(captions, keep.tolist())]


def teacher_metadata(cfg, vae_file, step, extra=None):
    """What pipeline.load_pipeline reads: the shapes text encoder, the VAE file, the sampling
    defaults and the world's sizes."""
    sampler = sampling_defaults(cfg)
    return training.checkpoint_metadata("train_teacher.py", cfg, TEXT_ENCODER, vae_file, sampler,
                                        shapes.SIZES.values(), train_steps=str(step),
                                        **(extra or {}))


def sampling_defaults(cfg):
    """The checkpoint's sampling defaults (an editing teacher's with its image guidance)."""
    image = {"image_cfg": cfg.sample_image_cfg} if cfg.task == "edit" else {}
    return {"steps": cfg.sample_steps, "cfg": cfg.sample_cfg, "shift": cfg.sample_shift,
            "sampler": "euler", **image}


def save_teacher(cfg, ema, step, extra=None):
    ema.save_pretrained(os.path.join(cfg.out, "model.safetensors"),
                        teacher_metadata(cfg, "vae.safetensors", step, extra))


def widen_input(state, in_channels):
    """A text-to-image MMDiT state dict for a model with more input channels (an inpainting or
    editing model): the patch embedding's new input channels start at zero, so it begins as the
    t2i model, ignoring the extra channels until training teaches it to use them."""
    w = state["x_embedder.proj.weight"]                                # [D, z, p, p]
    if w.shape[1] > in_channels:
        raise ValueError(f"--init has {w.shape[1]} input channels, more than {in_channels}")
    wide = torch.zeros(w.shape[0], in_channels, *w.shape[2:], dtype=w.dtype)
    wide[:, :w.shape[1]] = w
    return {**state, "x_embedder.proj.weight": wide}


def preview(pipe, path, seed=0):
    rng = torch.Generator().manual_seed(seed)
    captions = [shapes.random_caption(int(torch.randint(2**31, (1,), generator=rng)))
                for _ in range(8)]
    samples = pipeline.generate(pipe, captions, 64, 64, seed=seed, progress=False)
    save_grid(samples, path, nrow=4)


OPTION_RULES = {  # cli.check_options: each numeric option and what it allows
    "vae_steps": cli.COUNT, "vae_batch": cli.AT_LEAST_1, "vae_lr": cli.POSITIVE,
    "kl_weight": cli.NON_NEGATIVE, "vae_max_minutes": cli.NON_NEGATIVE, "steps": cli.COUNT,
    "batch_size": cli.AT_LEAST_1, "lr": cli.POSITIVE, "warmup": cli.AT_LEAST_1,
    "weight_decay": cli.NON_NEGATIVE, "grad_clip": cli.POSITIVE, "ema": cli.DECAY,
    "caption_dropout": (lambda v: 0 <= v <= 1, "a share in [0, 1]"), "t_mean": cli.FINITE,
    "image_dropout": (lambda v: 0 <= v <= 1, "a share in [0, 1]"), "sample_image_cfg": cli.NON_NEGATIVE,
    "t_std": cli.POSITIVE, "max_minutes": cli.NON_NEGATIVE, "sample_steps": cli.AT_LEAST_1,
    "sample_cfg": cli.NON_NEGATIVE, "sample_shift": cli.POSITIVE, "log_every": cli.AT_LEAST_1,
    "sample_every": cli.COUNT, "ckpt_every": cli.COUNT, "judge_n": cli.COUNT,
    "workers": (lambda v: v >= -1, "an integer >= 0, or -1 (auto)"), "seed": cli.SEED}


def check_config(cfg):
    """Every option's value checked before any work (the VAE phase takes minutes)."""
    for name, allowed in (("task", ("t2i", "inpaint", "edit")), ("vae_config", tuple(vae_lib.CONFIGS)),
                          ("model_config", tuple(mmdit.CONFIGS))):
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(cfg, name)!r}: choose one of "
                             f"{', '.join(allowed)}")
    cli.check_options(cfg, OPTION_RULES)
    for name in ("vae", "init"):
        path = getattr(cfg, name)
        if path and not cfg.resume and not os.path.isfile(path):
            raise ValueError(f"--{name} {path}: no such file (the shipped ones are in assets/)")
    n = len(shapes.SIZES)
    if not (cfg.vae or cfg.resume) and 0 < cfg.judge_n < n:  # judge_reconstructions splits it
        raise ValueError(f"--judge-n {cfg.judge_n}: the VAE phase judges its reconstructions at "
                         f"each of the world's {n} sizes; pass 0 (no judge) or {n} or more")
    training.check_writable(cfg, "out", "export")  # last: it makes (and removes) a file in each


def teacher_config(cfg, vae_config):
    """-> (the teacher's MMDiT config: --model-config fitted to the VAE's latents, the world's
    sizes and the text encoder; the --init model, or None)."""
    base = mmdit.CONFIGS[cfg.model_config]
    tokens = max(max(s) for s in shapes.SIZES.values()) // (vae_config.factor * base.patch_size)
    z = vae_config.z_channels
    in_channels = {"t2i": z, "inpaint": 2 * z + 1, "edit": 2 * z}[cfg.task]  # + mask, known / source
    mcfg = dataclasses.replace(base, in_channels=in_channels,
                               pos_embed_max_size=max(base.pos_embed_max_size, tokens),
                               out_channels=z, context_dim=TEXT_ENCODER["dim"],
                               pooled_dim=TEXT_ENCODER["pooled_dim"])
    init = mmdit.MMDiT.from_pretrained(cfg.init) if cfg.init and not cfg.resume else None
    if init is not None and dataclasses.replace(init.config, in_channels=mcfg.in_channels) != mcfg:
        raise ValueError(f"--init {cfg.init}: its architecture differs from --model-config "
                         f"{cfg.model_config} with the VAE's {z} latent channels")
    return mcfg, init


def train(cfg):
    check_config(cfg)
    world, device = training.init_world(cfg.device, cfg.batch_size)
    amp = cli.pick_dtype(cfg.dtype, device)
    workers = cfg.workers if cfg.workers >= 0 else (0 if device.type == "cpu" else
                                                     min(8, max(1, (os.cpu_count() or 2) - 2)))
    state_path = os.path.join(cfg.out, "state.safetensors")
    state = weights.load_state(state_path) if cfg.resume else None  # resolve_config: it is there
    start = state["step"] if state else 0
    vae_path = os.path.join(cfg.out, "vae.safetensors")
    given_vae = vae_lib.VAE.from_pretrained(cfg.vae) if cfg.vae and not cfg.resume else None
    vae_config = (vae_lib.VAE.from_pretrained(vae_path).config if cfg.resume else
                  given_vae.config if given_vae else vae_lib.CONFIGS[cfg.vae_config])
    mcfg, init = teacher_config(cfg, vae_config)  # checked before the VAE phase's minutes
    if world.main:
        training.start_run(cfg)  # --overwrite clears the folder; config.json
    # the VAE phase's records, then the teacher's steps before the saved state
    keep = lambda r: r.get("phase", "").startswith("vae") or r["step"] < start  # noqa: E731
    logf = training.open_log(os.path.join(cfg.out, "log.jsonl"), keep) if world.main else None

    def log(record):
        if logf:
            logf.write(json.dumps(record) + "\n")
            logf.flush()

    # phase 1 (skipped when the run already has its VAE); one process: rank 0, the others wait
    if given_vae is not None:
        if world.main:
            given_vae.save_pretrained(vae_path, weights.load_metadata(cfg.vae))
    elif not cfg.resume and world.main:  # a resumed run has its VAE (resolve_config checked)
        try:
            vae = train_vae(cfg, device, amp, workers, log).eval().requires_grad_(False)
        except KeyboardInterrupt:
            raise KeyboardInterrupt("in the VAE phase, which does not resume; start again with "
                                    f"--overwrite --out {cfg.out}") from None
        recon = judge_reconstructions(vae, cfg.judge_n, 99, device) if cfg.judge_n else {}
        print("vae reconstructions judged:", json.dumps(recon))
        log({"phase": "vae_judge", **recon})
        vae.save_pretrained(vae_path, {"command": "python train_teacher.py " + " ".join(sys.argv[1:]),
                                       "judge_reconstruction": json.dumps(recon)})
    world.barrier()
    vae = vae_lib.VAE.from_pretrained(vae_path, device=device, dtype=torch.float32)
    vae.eval().requires_grad_(False)
    print(f"vae: {vae_path} (latent shift {vae.config.shift:.4f}, scale {vae.config.scale:.4f})")

    # phase 2
    text_encoder = shapes.ShapesTextEncoder(TEXT_ENCODER["dim"], TEXT_ENCODER["pooled_dim"],
                                            TEXT_ENCODER["seed"]).to(device)
    torch.manual_seed(cfg.seed)
    model = mmdit.MMDiT(mcfg).to(device)
    if init is not None:
        model.load_state_dict(widen_input(init.state_dict(), mcfg.in_channels))
    ema = mmdit.MMDiT(mcfg).to(device).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            betas=(0.9, 0.99))
    if cfg.compile:
        model.compile_blocks()
    trained = world.wrap(model, device)  # DDP with several processes
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        print(f"resumed {cfg.out} at step {start}")
    print(f"teacher: {mmdit.count_params(model) / 1e6:.1f}M params, {cfg.steps} steps of "
          f"{cfg.batch_size} on {device} ({amp}) x {world.size} process(es), {workers} data workers")
    pipe = pipeline.Pipeline(model=ema, text_encoder=text_encoder, vae=vae, defaults=sampling_defaults(cfg),
                    sizes=list(shapes.SIZES.values()), path=cfg.out)

    def save_state(step):
        if not world.main:
            return
        weights.save_state({"model": model.state_dict(), "ema": ema.state_dict(),
                            "optimizer": opt.state_dict(), "step": step}, state_path)
        save_teacher(cfg, ema, step)

    data = scene_loader(cfg.batch_size, cfg.seed, start, workers, edit=cfg.task == "edit")
    t0, seen, step = time.time(), 0, start
    bar = tqdm(range(start, cfg.steps), desc="teacher", initial=start, total=cfg.steps,
               dynamic_ncols=True, disable=not world.main)
    with training.finish_step_on_interrupt() as interrupt:  # Ctrl-C: finish the step, save
        for step in bar:
            images, captions, *sources = next(data)                         # the global batch
            g = training.step_generator(cfg.seed, step, device)
            captions = world.rows(drop_captions(captions, cfg.caption_dropout, g))
            with torch.no_grad():
                x0 = vae.encode(world.rows(images).to(device))              # [B / N, z, h, w]
                context, pooled = text_encoder.encode(captions)
                known = None
                if cfg.task == "inpaint":  # a mask per image of the global batch, then this rank's
                    rng = np.random.default_rng([cfg.seed, step, 1])
                    masks = world.rows(torch.stack([inpainting.random_mask(im, rng) for im in images]))
                    m = inpainting.latent_mask(masks, vae.config.factor).to(device)  # [B / N, 1, h, w]
                    known = inpainting.known_channels(x0, m)                   # [B / N, 1 + z, h, w]
                if cfg.task == "edit":  # the source's latent, zero in a share of rows
                    drop = world.rows(torch.rand(len(images), generator=g, device=device) < cfg.image_dropout)
                    known = vae.encode(world.rows(sources[0]).to(device))       # [B / N, z, h, w]
                    known = known * ~drop[:, None, None, None]
            lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
            for group in opt.param_groups:
                group["lr"] = lr
            with training.autocast(device, amp):
                loss = flow_loss(trained, x0, context, pooled, g, cfg.t_mean, cfg.t_std, world, known)
            gnorm, skipped = training.update(opt, loss, model.parameters(), cfg.grad_clip, world)
            if not skipped:
                training.ema_update(ema, model, cfg.ema if step >= cfg.warmup else 0.0)
            seen += cfg.batch_size
            if step % cfg.log_every == 0:
                rate = seen / (time.time() - t0)
                mean_loss = world.mean({"loss": loss.item()})["loss"]
                log({"phase": "teacher", "step": step, "loss": mean_loss, "grad_norm": gnorm,
                     "lr": lr, "samples_per_s": rate})
                bar.set_postfix(loss=f"{mean_loss:.4f}", sps=f"{rate:.0f}", refresh=False)
            if (cfg.sample_every and step % cfg.sample_every == 0 and step > start and world.main
                    and cfg.task == "t2i"):
                preview(pipe, os.path.join(cfg.out, f"samples_{step:06d}.png"))
            if cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0:
                save_state(step + 1)
            if cfg.max_minutes and not world.all_true(time.time() - t0 <= 60 * cfg.max_minutes):
                print(f"stopping after {cfg.max_minutes} minutes at step {step + 1}")
                break
            if not world.all_true(not interrupt.requested):
                save_state(step + 1)
                raise training.interrupted("train_teacher.py", cfg.out, step + 1)
    step = step + 1 if cfg.steps > start else start
    save_state(step)
    if not world.main:  # rank 0 judges and writes; the weights are the same on every rank
        return ema
    extra = {"train_minutes": f"{(time.time() - t0) / 60:.1f}", "samples_seen": str(seen)}
    if cfg.task == "t2i":
        preview(pipe, os.path.join(cfg.out, "samples_final.png"))
    if cfg.judge_n:
        if cfg.task == "inpaint":  # edits with a known answer, judged against the new caption
            scores = metrics.judge_edits(pipe, cfg.judge_n, progress=True)
        elif cfg.task == "edit":  # instructions with a known answer: followed, preserved, both
            scores = editing.evaluate(pipe, cfg.judge_n, progress=True)[0]
        else:
            scores = metrics.judge_pipeline(pipe, cfg.judge_n, seed=1234, progress=True)
        print("judge:", json.dumps(scores))
        log({"phase": "judge", "step": step, **scores})
        extra["judge"] = json.dumps(scores)
    save_teacher(cfg, ema, step, extra)
    print(f"teacher: {os.path.join(cfg.out, 'model.safetensors')}")
    if cfg.export:
        export(cfg, vae, ema, step, extra)
    return ema


def export(cfg, vae, ema, step, extra):
    """The shipped form: fp16 copies (half the size; loaders convert back to fp32 on the CPU),
    the teacher as SHIPPED[task] and, when this run trained it, the VAE as shapes_vae."""
    os.makedirs(cfg.export, exist_ok=True)
    names = [training.SHIPPED[cfg.task]]
    if not cfg.vae:
        vae_meta = weights.load_metadata(os.path.join(cfg.out, "vae.safetensors"))
        vae_meta.pop("config", None)
        half_vae = vae_lib.VAE(vae.config).to(torch.float16)
        half_vae.load_state_dict(vae.state_dict())
        half_vae.save_pretrained(os.path.join(cfg.export, "shapes_vae.safetensors"), vae_meta)
        names.append("shapes_vae.safetensors")
    half = mmdit.MMDiT(ema.config).to(torch.float16)
    half.load_state_dict(ema.state_dict())
    half.save_pretrained(os.path.join(cfg.export, training.SHIPPED[cfg.task]),
                         teacher_metadata(cfg, "shapes_vae.safetensors", step, extra))
    print(f"exported {' and '.join(os.path.join(cfg.export, n) for n in names)}")


def main(argv=None):
    return cli.training_main(Config, PRESETS, train, argv, "train_teacher.py", __doc__,
                             may_change=MAY_CHANGE,
                             resume_needs=("state.safetensors", "vae.safetensors"))


if __name__ == "__main__":
    main()

"""
Train the shapes world's teacher, in one command: first its tiny VAE, then the tiny MMDiT teacher
with rectified flow. This is what makes `assets/shapes_vae.safetensors` and
`assets/shapes_teacher.safetensors`, the models `python train_ladd.py` distils by default.

    python train_teacher.py                    # the recipe of the shipped weights (a GPU)
    python train_teacher.py --preset quick     # a few minutes on a laptop CPU
    python train_teacher.py --resume runs/teacher

Phase 1, the VAE: scenes rendered on the fly, L1 reconstruction + a small KL term; then the
latents' mean and standard deviation are measured and stored as its shift and scale, so the
teacher sees latents of unit variance.
Phase 2, the teacher: x_t = (1 - t) x0 + t eps with t ~ logit-normal, the MMDiT regresses the
velocity eps - x0; captions are dropped (replaced by "") 10 % of the time so classifier-free
guidance works; each batch is one aspect-ratio bucket; an EMA of the weights is what is saved.
Every step's data and noise are a pure function of (seed, step), so a resumed run continues
exactly where it stopped.
"""

import atexit
import dataclasses
import datetime
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import flow
import inpaint
import mmdit
import shapes
import vae as vae_lib
import weights
from sample import Pipeline, generate, pick_device, pick_dtype, run_cli, save_grid


@dataclass
class Config:
    out: str = "runs/teacher"          # run folder: checkpoints, log.jsonl, sample grids
    resume: str = ""                   # a run folder to continue
    preset: str = "default"            # default | quick (a few CPU minutes) | test (seconds)
    seed: int = 0                      # data, noise and init all derive from it
    device: str = "auto"               # auto: cuda, then mps, then cpu
    dtype: str = "auto"                # autocast dtype: auto = bf16 on CUDA, fp32 elsewhere
    workers: int = -1                  # data-rendering processes; -1 = auto (0 on CPU)
    # phase 1: VAE
    vae: str = ""                      # use this VAE file instead of training one (skips phase 1)
    vae_config: str = "shapes"         # vae.CONFIGS name (x4, 4 latent channels)
    vae_steps: int = 3000              # VAE training steps
    vae_batch: int = 128
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6            # small: the latent is rescaled afterwards anyway
    vae_max_minutes: float = 0.0       # stop the VAE phase after this wall time (0: no limit)
    # phase 2: teacher
    task: str = "t2i"                  # t2i | inpaint (input: noisy latent, mask, known latent)
    init: str = ""                     # start from this teacher's weights (inpaint: a t2i one)
    model_config: str = "shapes"       # mmdit.CONFIGS name
    steps: int = 7000                  # teacher training steps
    batch_size: int = 256
    lr: float = 6e-4                   # AdamW, linear warm-up then constant
    warmup: int = 500
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema: float = 0.999                 # EMA decay of the saved weights
    caption_dropout: float = 0.1       # share of "" captions (unconditional, for CFG)
    t_mean: float = 0.0                # logit-normal(t_mean, t_std) training times (SD3's)
    t_std: float = 1.0
    max_minutes: float = 0.0           # stop the teacher phase after this wall time (0: no limit)
    compile: bool = False              # torch.compile the teacher's blocks
    # sampling defaults stored in the checkpoint (what sample.py uses)
    sample_steps: int = 28
    sample_cfg: float = 4.0
    sample_shift: float = 1.0
    # bookkeeping
    log_every: int = 50
    sample_every: int = 2000           # preview grid (EMA weights, default sampler)
    ckpt_every: int = 1000             # resumable training state
    judge_n: int = 256                 # captions judged at the end (0: skip)
    export: str = ""                   # also write the fp16 shipped files (below) into this folder


PRESETS = {
    "default": {},
    "quick": dict(vae="assets/shapes_vae.safetensors", steps=900, batch_size=32, lr=1e-3,
                  warmup=100, ema=0.99, sample_every=300, ckpt_every=300, judge_n=64,
                  log_every=25),
    # an inpainting teacher fine-tuned from the shipped one: a few CPU minutes
    "inpaint": dict(task="inpaint", init="assets/shapes_teacher.safetensors",
                    vae="assets/shapes_vae.safetensors", steps=600, batch_size=32, lr=2e-4,
                    warmup=50, ema=0.99, sample_every=0, ckpt_every=200, judge_n=128,
                    log_every=25),
    "test": dict(vae_config="test", vae_steps=3, vae_batch=4, model_config="test", steps=4,
                 batch_size=4, warmup=1, sample_every=0, ckpt_every=2, judge_n=4, log_every=1,
                 sample_steps=2),
}

TEXT_ENCODER = {"name": "shapes", "dim": 64, "pooled_dim": 64, "seed": 0}


def parse_given(cls, presets, argv, doc):
    """The CLI of a training script, generated from its config dataclass. Returns only the
    options given on the command line; `resolve_config` puts the preset (or, with --resume, the
    run's saved config) under them."""
    import argparse
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], allow_abbrev=False)
    for f in dataclasses.fields(cls):
        if isinstance(f.default, bool):  # a switch: given means on
            p.add_argument("--" + f.name.replace("_", "-"), action="store_const", const=True,
                           default=None, help="(default: off)")
        else:
            p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None,
                           help=f"(default: {f.default})")
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    if given.get("preset", "default") not in presets:
        p.error(f"--preset {given['preset']!r}: choose one of {', '.join(presets)}")
    return given


def resolve_config(cls, presets, given, script):
    if given.get("resume"):
        path = os.path.join(given["resume"], "config.json")
        if not os.path.isfile(path):
            raise SystemExit(f"error: --resume {given['resume']}: no config.json there; pass a "
                             f"run folder made by {script}")
        with open(path) as f:
            return cls(**{**json.load(f), **given, "out": given["resume"]})
    return cls(**{**presets[given.get("preset", "default")], **given})


# ----------------------------------------------------------------------------------------------
# several processes: `torchrun --nproc_per_node=N train_ladd.py` (or train_teacher.py)


@dataclass
class World:
    """This process's place among torchrun's N processes (one process: rank 0 of 1).

    One code path for any N: every random draw of a step (rows, times, noises) is made for the
    whole global batch on every rank, each rank keeps its own rows, and DDP averages the
    gradients. So N processes compute what one process computes on the same global batch, and
    every rank holds the same weights. Rank 0 alone writes files, logs, grids and judges."""
    rank: int = 0
    size: int = 1
    device: str = "cpu"  # where collectives run: NCCL reduces CUDA tensors only

    @property
    def main(self):
        return self.rank == 0

    def rows(self, x):
        """This rank's share of a global batch (tensor or list): its contiguous block of rows."""
        if len(x) % self.size:
            raise ValueError(f"a batch of {len(x)} does not split over {self.size} processes; "
                             f"make --batch-size a multiple of {self.size}")
        n = len(x) // self.size
        return x[self.rank * n:(self.rank + 1) * n]

    def wrap(self, module, device, shard=False):
        """The module to train: itself with one process; DDP around it (a full copy on every
        rank, gradients averaged, overlapped with backward); or with `shard`, FSDP (PyTorch's
        fully_shard, in place): each joint block's weights, gradients and optimizer state are
        split over the ranks and gathered block by block when used. Create optimizers after."""
        if self.size == 1:
            return module
        if shard:
            from torch.distributed.fsdp import fully_shard
            for block in module.joint_blocks:
                fully_shard(block)
            return fully_shard(module)
        return torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None)

    def state(self, module, opt=None):
        """The whole state dict of a module (or of its optimizer) on rank 0's CPU; gathered from
        the shards of an FSDP module, a collective that every rank must call."""
        if not is_sharded(module):
            return module.state_dict() if opt is None else opt.state_dict()
        from torch.distributed.checkpoint import state_dict as dcp
        full = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)
        if opt is None:
            return dcp.get_model_state_dict(module, options=full)
        return dcp.get_optimizer_state_dict(module, opt, options=full)

    def load(self, module, state, opt=None):
        """The inverse of `state`: every rank passes the whole state dict; FSDP keeps its share."""
        if not is_sharded(module):
            return module.load_state_dict(state) if opt is None else opt.load_state_dict(state)
        from torch.distributed.checkpoint import state_dict as dcp
        full = dcp.StateDictOptions(full_state_dict=True)
        if opt is None:
            return dcp.set_model_state_dict(module, state, options=full)
        return dcp.set_optimizer_state_dict(module, opt, state, options=full)

    def all_true(self, flag):
        """True when `flag` holds on every rank: decisions that change control flow (skip a
        step, stop early) must be the same on all ranks, or the next collective waits forever."""
        if self.size == 1:
            return bool(flag)
        x = torch.tensor(float(bool(flag)), device=self.device)
        dist.all_reduce(x, op=dist.ReduceOp.MIN)
        return bool(x)

    def mean(self, stats):
        """The average over ranks of a dict of numbers (for the log)."""
        if self.size == 1:
            return stats
        x = torch.tensor(list(stats.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(x)
        return dict(zip(stats, (x / self.size).tolist()))

    def barrier(self):
        if self.size > 1:
            dist.barrier()


def is_sharded(module):
    return any(hasattr(p, "full_tensor") for p in module.parameters())  # DTensor weights: FSDP


def init_world(device_name, batch_size):
    """-> (World, device). torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; without them this is
    one process on `device_name`. Several processes use cuda:LOCAL_RANK with NCCL, or the CPU
    with gloo; ranks other than 0 print nothing. The global batch must split evenly."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if batch_size % size:
        raise ValueError(f"--batch-size {batch_size} does not split over {size} processes; make "
                         f"it a multiple of {size}")
    if size == 1:
        return World(), device
    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ValueError(f"--device {device_name}: several processes run on cuda or cpu, not "
                         f"{device.type}; pass --device cpu or launch one process")
    if not dist.is_initialized():  # long timeout: rank 0 may sample or judge while others wait
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(hours=2))
        atexit.register(dist.destroy_process_group)
    if rank:
        sys.stdout = open(os.devnull, "w")
    return World(rank, dist.get_world_size(), str(device)), device


# ----------------------------------------------------------------------------------------------
# data


class SceneStream(torch.utils.data.IterableDataset):
    """shapes.batches from a given step on, split over worker processes in step order."""
    def __init__(self, batch_size, seed, start_step):
        self.batch_size, self.seed, self.start = batch_size, seed, start_step

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, n = (info.id, info.num_workers) if info else (0, 1)
        # worker k renders steps start + k, start + k + n, ...; the loader interleaves them
        for images, captions, _ in shapes.batches(self.batch_size, seed=self.seed,
                                                  start_step=self.start + wid, stride=n):
            yield images, captions


def scene_loader(batch_size, seed, start_step, workers):
    return iter(torch.utils.data.DataLoader(
        SceneStream(batch_size, seed, start_step), batch_size=None, num_workers=workers,
        collate_fn=lambda b: b, prefetch_factor=4 if workers else None,
        persistent_workers=False))


def step_generator(seed, step, device):
    """Noise and timesteps of a step are drawn from a generator seeded by (seed, step)."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + step)


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
        with torch.autocast(device.type, dtype=amp, enabled=amp != torch.float32):
            loss = vae_loss(model, images, step_generator(cfg.seed, step, device), cfg.kl_weight)
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


def flow_loss(model, x0, context, pooled, generator, t_mean, t_std, world=World(), extra=None):
    """Rectified flow: regress the velocity eps - x0 at a logit-normal time. x0 holds this
    rank's rows; times and noises are drawn for the global batch (see World). extra: channels
    appended to the model's input (an inpainting model's mask and known latent)."""
    n = len(x0) * world.size
    t = world.rows(flow.sample_t_logit_normal(n, t_mean, t_std, generator, x0.device))  # [B]
    noise = world.rows(torch.randn((n, *x0.shape[1:]), generator=generator, device=x0.device))
    x_t = flow.add_noise(x0, noise, t)                                                 # [B, C, H, W]
    v = model(x_t if extra is None else torch.cat([x_t, extra], 1), t, context, pooled)
    return F.mse_loss(v.float(), flow.velocity_target(x0, noise))


def drop_captions(captions, p, generator):
    keep = torch.rand(len(captions), generator=generator, device=generator.device) >= p
    return [c if k else "" for c, k in zip(captions, keep.tolist())]


@torch.no_grad()
def ema_update(ema, model, decay):
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)


def checkpoint_metadata(cfg, vae_file, extra=None):
    meta = {
        "text_encoder": json.dumps(TEXT_ENCODER),
        "vae": vae_file,
        "sampler": json.dumps({"steps": cfg.sample_steps, "cfg": cfg.sample_cfg,
                               "shift": cfg.sample_shift, "sampler": "euler"}),
        "sizes": json.dumps([list(s) for s in shapes.SIZES.values()]),
        "command": "python train_teacher.py " + " ".join(sys.argv[1:]),
        "train_config": json.dumps(asdict(cfg)),
    }
    meta.update(extra or {})
    return meta


def save_teacher(cfg, ema, step, extra=None):
    ema.save_pretrained(os.path.join(cfg.out, "model.safetensors"),
                        checkpoint_metadata(cfg, "vae.safetensors",
                                            {"train_steps": str(step), **(extra or {})}))


def widen_input(state, in_channels):
    """A text-to-image MMDiT state dict for a model with more input channels (an inpainting
    model): the patch embedding's new input channels start at zero, so it begins as the t2i
    model, ignoring the mask and the known latent until training teaches it to use them."""
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
    images = generate(pipe, captions, 64, 64, seed=seed, progress=False)
    save_grid(images, path, nrow=4)


def train(cfg):
    if cfg.task not in ("t2i", "inpaint"):
        raise ValueError(f"--task {cfg.task!r}: choose t2i or inpaint")
    world, device = init_world(cfg.device, cfg.batch_size)
    amp = pick_dtype(cfg.dtype, device)
    workers = cfg.workers if cfg.workers >= 0 else (0 if device.type == "cpu" else
                                                     min(8, max(1, (os.cpu_count() or 2) - 2)))
    os.makedirs(cfg.out, exist_ok=True)
    state_path = os.path.join(cfg.out, "state.safetensors")
    state = weights.load_state(state_path) if cfg.resume and os.path.isfile(state_path) else None
    logf = open(os.path.join(cfg.out, "log.jsonl"), "a") if world.main else None

    def log(record):
        if logf:
            logf.write(json.dumps(record) + "\n")
            logf.flush()

    if world.main:
        weights.atomic_write(os.path.join(cfg.out, "config.json"),
                             lambda f: f.write(json.dumps(asdict(cfg), indent=1).encode()))

    # phase 1 (skipped when the run already has its VAE); one process: rank 0, the others wait
    vae_path = os.path.join(cfg.out, "vae.safetensors")
    if cfg.vae and not cfg.resume:
        if not os.path.isfile(cfg.vae):
            raise SystemExit(f"error: --vae {cfg.vae}: no such file; train one (leave --vae "
                             "empty) or pass the shipped assets/shapes_vae.safetensors")
        if world.main:
            vae_lib.VAE.from_pretrained(cfg.vae).save_pretrained(vae_path,
                                                                 weights.load_metadata(cfg.vae))
    elif not (cfg.resume and os.path.isfile(vae_path)) and world.main:
        vae = train_vae(cfg, device, amp, workers, log).eval().requires_grad_(False)
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
    base = mmdit.CONFIGS[cfg.model_config]
    tokens = max(max(s) for s in shapes.SIZES.values()) // (vae.config.factor * base.patch_size)
    z = vae.config.z_channels
    mcfg = dataclasses.replace(base, in_channels=2 * z + 1 if cfg.task == "inpaint" else z,
                               pos_embed_max_size=max(base.pos_embed_max_size, tokens),
                               out_channels=vae.config.z_channels,
                               context_dim=text_encoder.context_dim,
                               pooled_dim=text_encoder.pooled_dim)
    torch.manual_seed(cfg.seed)
    model = mmdit.MMDiT(mcfg).to(device)
    if cfg.init:
        init = mmdit.MMDiT.from_pretrained(cfg.init)
        if dataclasses.replace(init.config, in_channels=mcfg.in_channels) != mcfg:
            raise ValueError(f"--init {cfg.init}: its architecture differs from --model-config "
                             f"{cfg.model_config} with the VAE's {z} latent channels")
        model.load_state_dict(widen_input(init.state_dict(), mcfg.in_channels))
    ema = mmdit.MMDiT(mcfg).to(device).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            betas=(0.9, 0.99))
    if cfg.compile:
        model.compile_blocks()
    trained = world.wrap(model, device)  # DDP with several processes
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
        print(f"resumed {cfg.out} at step {start}")
    print(f"teacher: {mmdit.count_params(model) / 1e6:.1f}M params, {cfg.steps} steps of "
          f"{cfg.batch_size} on {device} ({amp}) x {world.size} process(es), {workers} data workers")
    pipe = Pipeline(model=ema, text_encoder=text_encoder, vae=vae,
                    defaults={"steps": cfg.sample_steps, "cfg": cfg.sample_cfg,
                              "shift": cfg.sample_shift, "sampler": "euler"},
                    sizes=list(shapes.SIZES.values()), path=cfg.out)

    def save_state(step):
        if not world.main:
            return
        weights.save_state({"model": model.state_dict(), "ema": ema.state_dict(),
                            "optimizer": opt.state_dict(), "step": step}, state_path)
        save_teacher(cfg, ema, step)

    data = scene_loader(cfg.batch_size, cfg.seed, start, workers)
    t0, seen, step = time.time(), 0, start
    bar = tqdm(range(start, cfg.steps), desc="teacher", initial=start, total=cfg.steps,
               dynamic_ncols=True, disable=not world.main)
    for step in bar:
        images, captions = next(data)                                   # the global batch
        g = step_generator(cfg.seed, step, device)
        captions = world.rows(drop_captions(captions, cfg.caption_dropout, g))
        with torch.no_grad():
            x0 = vae.encode(world.rows(images).to(device))              # [B / N, z, h, w]
            context, pooled = text_encoder.encode(captions)
            extra = None
            if cfg.task == "inpaint":  # a mask per image of the global batch, then this rank's
                rng = np.random.default_rng([cfg.seed, step, 1])
                masks = world.rows(torch.stack([inpaint.random_mask(im, rng) for im in images]))
                m = inpaint.latent_mask(masks, vae.config.factor).to(device)  # [B / N, 1, h, w]
                extra = inpaint.known_channels(x0, m)                   # [B / N, 1 + z, h, w]
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.autocast(device.type, dtype=amp, enabled=amp != torch.float32):
            loss = flow_loss(trained, x0, context, pooled, g, cfg.t_mean, cfg.t_std, world, extra)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if torch.isfinite(gnorm):
            opt.step()
            ema_update(ema, model, cfg.ema if step >= cfg.warmup else 0.0)
        seen += cfg.batch_size
        if step % cfg.log_every == 0:
            rate = seen / (time.time() - t0)
            mean_loss = world.mean({"loss": loss.item()})["loss"]
            log({"phase": "teacher", "step": step, "loss": mean_loss, "grad_norm": gnorm.item(),
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
    step = step + 1 if cfg.steps > start else start
    save_state(step)
    if not world.main:  # rank 0 judges and writes; the weights are the same on every rank
        return ema
    extra = {"train_minutes": f"{(time.time() - t0) / 60:.1f}", "samples_seen": str(seen)}
    if cfg.task == "t2i":
        preview(pipe, os.path.join(cfg.out, "samples_final.png"))
    if cfg.judge_n:
        if cfg.task == "inpaint":  # edits with a known answer, judged against the new caption
            scores = inpaint.evaluate_edits(pipe, cfg.judge_n, progress=True)
        else:
            from evaluate import judge_pipeline
            scores = judge_pipeline(pipe, cfg.judge_n, seed=1234, progress=True)
        print("judge:", json.dumps(scores))
        log({"phase": "judge", "step": step, **scores})
        extra["judge"] = json.dumps(scores)
    save_teacher(cfg, ema, step, extra)
    print(f"teacher: {os.path.join(cfg.out, 'model.safetensors')}")
    if cfg.export:
        export(cfg, vae, ema, step, extra)
    return ema


SHIPPED = {"t2i": "shapes_teacher.safetensors", "inpaint": "shapes_inpaint_teacher.safetensors"}


def export(cfg, vae, ema, step, extra):
    """The shipped form: fp16 copies (half the size; loaders convert back to fp32 on the CPU),
    the teacher as SHIPPED[task] and, when this run trained it, the VAE as shapes_vae."""
    os.makedirs(cfg.export, exist_ok=True)
    names = [SHIPPED[cfg.task]]
    if not cfg.vae:
        vae_meta = weights.load_metadata(os.path.join(cfg.out, "vae.safetensors"))
        vae_meta.pop("config", None)
        half_vae = vae_lib.VAE(vae.config).to(torch.float16)
        half_vae.load_state_dict(vae.state_dict())
        half_vae.save_pretrained(os.path.join(cfg.export, "shapes_vae.safetensors"), vae_meta)
        names.append("shapes_vae.safetensors")
    half = mmdit.MMDiT(ema.config).to(torch.float16)
    half.load_state_dict(ema.state_dict())
    half.save_pretrained(os.path.join(cfg.export, SHIPPED[cfg.task]),
                         checkpoint_metadata(cfg, "shapes_vae.safetensors",
                                             {"train_steps": str(step), **extra}))
    print(f"exported {' and '.join(os.path.join(cfg.export, n) for n in names)}")


def main(argv=None):
    return run_cli(lambda a: parse_given(Config, PRESETS, a, __doc__),
                   lambda given: train(resolve_config(Config, PRESETS, given, "train_teacher.py")),
                   argv)


if __name__ == "__main__":
    main()

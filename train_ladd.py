"""
Latent Adversarial Diffusion Distillation (LADD): a many-step, guided teacher becomes a few-step,
unguided student.

    python train_ladd.py                          # the shipped shapes teacher -> a 4-step student
    python train_ladd.py --resume runs/ladd       # continue a stopped run exactly
    python train_ladd.py --teacher sd3_medium.safetensors --cond cond.safetensors --out runs/sd3

One step (student_step and heads_step below; the heads are in discriminator.py):

  data      x0 = a latent the teacher generated itself (guided, many steps), with its prompt
  student   t in {1, .75, .5, .25} with p = .7, .1, .1, .1; x_t = (1 - t) x0 + t eps;
            x0_hat = x_t - t student(x_t, t)
  re-noise  t_hat ~ logit-normal(0, 2); fake = x0_hat noised to t_hat, real = x0 noised to t_hat
            (the same t_hat, separate noises)
  judge     the frozen teacher runs on fake (with autograd) and on real; a small head per
            teacher block reads its image tokens and says real (logit > 0) or fake
  student   loss -(sum over heads of mean(fake logits)), back-propagated through the frozen
            teacher into the student; one AdamW step
  heads     then, on the same fake features: hinge loss, real logits up, fake logits down

The student starts as a copy of the teacher, never sees guidance, and samples in 4 steps at the
times it trained at. That is all of LADD; terms from other methods (DMD's pairs, ADD's
distillation loss, R1) are in addons.py, off by default, one option each.

Everything random in a step (batch, times, noises) is drawn from a generator seeded by
(seed, step), so `--resume` continues exactly where an interrupted run stopped. The teacher's
samples are made once and cached (assets/data holds the default run's), shared by every run
with the same settings. docs/ladd.md has every detail and the measured choices.
"""

import json
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

import addons
import cli
import flow
import inpainting
import ladd_data
import ladd_run
import training
from discriminator import Discriminator, hinge_heads_loss, hinge_student_loss


@dataclass
class Config:  # pragma: no mutate block (settings, not the method: docs/developers.md)
    # LADD (the paper's method; every default measured on the shapes world, docs/results.md)
    steps: int = 3200                  # student updates, one heads update each
    batch_size: int = 8                # latents per step, all of one size (aspect-ratio bucket)
    lr: float = 1e-5                   # student AdamW
    disc_lr: float = 1e-3              # heads AdamW, beta1 = 0
    times: str = "1,0.75,0.5,0.25"     # the student's timesteps (its sampler's schedule)
    time_probs: str = "0.7,0.1,0.1,0.1"  # how often each is trained
    warmup_probs: str = "0,0,0.5,0.5"  # ... during the first `warmup` steps (low noise first)
    warmup: int = 30                   # steps drawn with warmup_probs
    t_hat_mean: float = 0.0            # re-noising level t_hat ~ logit-normal(mean, std); the paper: 1
    t_hat_std: float = 2.0             # its spread (the paper: 1); wider judges more low-noise detail
    disc_blocks: str = "all"           # teacher blocks with a head: all | lastN | 0,2,3
    disc_hidden: int = 48              # head width
    grad_clip: float = 1.0             # clip both gradients to this norm
    ema: float = 0.995                 # EMA decay of the student used for sampling ...
    ema_warmup: int = 10               # ... ramped: min(ema, (1 + s) / (ema_warmup + s)) at step s
    sampler: str = "renoise"           # the student's sampler stored in its checkpoint
    seed: int = 0                      # data, noise, heads and student init all derive from it
    # the teacher and its data
    teacher: str = ""                  # MMDiT checkpoint file or run folder ("": the shipped one)
    task: str = "t2i"                  # t2i | inpaint | edit (an inpainting or editing teacher; shapes world)
    prompts: str = ""                  # prompts file, one a line ("": random shapes-world captions)
    cond: str = ""                     # precomputed conditioning file or shard folder, not prompts
    data: str = "synthetic"            # synthetic: teacher latents | real: world renders via the VAE
    data_size: int = 576               # latents in the dataset, split evenly over the sizes
    data_sizes: str = ""               # its aspect-ratio buckets, e.g. many or 64x64,112x48 ("": the teacher's)
    data_dir: str = "runs/data"        # dataset cache; reused by every run with the same settings
    data_steps: int = 0                # teacher sampling steps for synthetic data (0: its default)
    data_cfg: float = 0.0              # teacher guidance for synthetic data (0: its default)
    # the student
    student_config: str = ""           # mmdit.CONFIGS name of a different student ("": the teacher's)
    lora: int = 0                      # LoRA rank: train adapters on the shared teacher (0: all weights)
    lora_alpha: float = 0.0            # adapters scaled by alpha / rank (0: alpha = rank)
    lora_targets: str = "attn"         # layers with adapters: attn, mlp, mod (comma-separated)
    # add-ons from other methods (addons.py), all off: 0 is plain LADD
    pair_weight: float = 0.0           # DMD's pairs: weight of |x0_hat - x0|^2 on rows from x0's own noise
    pair_share: float = 0.5            # ... the share of t = 1 rows that are paired (synthetic data only)
    pair_steps: int = 0                # ... only in the first this many steps (0: every step)
    distill_weight: float = 0.0        # ADD's distillation loss onto the guided teacher's x0
    r1_weight: float = 0.0             # approximate R1 penalty on the heads
    consistency_weight: float = 0.0    # 1-2 steps: |x0_hat - sg(own x0 at the teacher's next point)|^2
    dmd_weight: float = 0.0            # 1-2 steps: DMD's distribution matching, online fake score
    one_step_t_hat_shift: float = 1.0  # 1 step: t = 1 rows judged at shifted t_hat (< 1: less noise)
    # the run
    out: str = "runs/ladd"             # run folder: student, state, log.jsonl, comparison grids
    resume: str = ""                   # a run folder to continue (its saved settings)
    overwrite: bool = False            # start again in an --out that holds a run (replaces it)
    preset: str = "default"            # default | pairs | edit | test (PRESETS below)
    device: str = "auto"               # auto: cuda, then mps, then cpu
    dtype: str = "auto"                # autocast dtype: auto = bf16 on CUDA, fp32 elsewhere
    optim_dtype: str = "fp32"          # the student's AdamW moments: fp32 | bf16 (half the memory)
    checkpointing: str = "auto"        # gradient checkpointing: auto (on CUDA) | on | off
    compile: bool = False              # torch.compile the student's and teacher's blocks
    shard: bool = False                # under torchrun: FSDP-shard student, EMA, AdamW (8B models)
    log_every: int = 10                # a log.jsonl line every this many steps
    grid_every: int = 200              # comparison grid every this many steps (0: only at the end)
    ckpt_every: int = 200              # resumable state every this many steps
    judge_n: int = 256                 # shapes world: captions judged at the end (0: skip)
    judge_sizes: str = ""              # ... at these sizes, e.g. unseen or 64x64,128x48 ("": trained)
    max_minutes: float = 0.0           # stop after this wall time (0: no limit)
    memory_report: bool = False        # print estimated and measured memory per component


PRESETS = {
    "default": {},                                           # plain LADD
    "pairs": dict(pair_weight=30.0, pair_steps=1600),        # + DMD's pairs in the first half
    "edit": dict(task="edit", steps=2000, out="runs/ladd_edit"),  # editing: 12 min on 2 CPU cores
    "test": dict(data_size=8, steps=4, batch_size=2, warmup=1, log_every=1, grid_every=0,
                 ckpt_every=2, judge_n=4),
}
# options a resumed run may change; every other one must equal the run's saved config
MAY_CHANGE = (
    "steps", "pair_steps", "max_minutes", "log_every", "grid_every", "ckpt_every", "judge_n",
    "judge_sizes", "memory_report", "data_dir", "device", "compile", "checkpointing")


# ----------------------------------------------------------------------------------------------
# one step's data and random draws


@dataclass
class Batch:
    """One step's data and random draws: this rank's rows of the global batch (training.World).
    Shapes: B rows of latents [C, h, w]; the teacher's token maps are [D, h/p, w/p] (patch p)."""
    x0: torch.Tensor                 # [B, C, h, w] the teacher's own samples: the "real" data
    context: torch.Tensor            # [B, L, Dc] their prompts' text tokens
    pooled: torch.Tensor             # [B, Dp] and pooled text vectors
    t: torch.Tensor                  # [B] the student's times
    t_hat: torch.Tensor              # [B] the re-noising level the heads judge at
    eps: torch.Tensor                # [B, C, h, w] noise of the student's input
    eps_fake: torch.Tensor           # [B, C, h, w] re-noises the student's x0_hat
    eps_real: torch.Tensor           # [B, C, h, w] re-noises x0
    known: torch.Tensor = None       # inpainting only: mask and known latent [B, 1 + C, h, w]
    paired: torch.Tensor = None      # [B] bool, the pairs add-on: eps is the noise of x0
    generator: torch.Generator = None  # the step's random generator, for draws inside a step (R1)

    def input(self, x):
        """What student and teacher read: x (text-to-image), or x with the known channels."""
        return inpainting.with_known(x, self.known)


def student_times(n, step, times, probs, warmup_probs, warmup, generator):
    """The student's training timesteps [n]: drawn from `times` with `warmup_probs` for the first
    `warmup` steps (low noise only: the student first learns to finish images), then `probs`."""
    p = torch.tensor(warmup_probs if step < warmup else probs, dtype=torch.float)
    index = torch.multinomial(p, n, replacement=True, generator=generator)
    return torch.tensor(times, dtype=torch.float)[index]                   # [n]


def draw_batch(cfg, dataset, schedule, step, world, device):
    """Step `step`'s global batch and all its random draws, made from one generator seeded by
    (seed, step) and so the same on every rank; this rank keeps its rows."""
    g = training.step_generator(cfg.seed, step)
    data = ladd_data.sample_batch(dataset, cfg.batch_size, g)
    x0 = data["latents"]                                                      # [B, C, h, w]
    B = x0.shape[0]
    t = student_times(B, step, *schedule, cfg.warmup, g)                      # [B]
    t_hat = flow.sample_t_logit_normal(B, cfg.t_hat_mean, cfg.t_hat_std, g)  # [B]
    t_hat = addons.shift_one_step(t, t_hat, cfg.one_step_t_hat_shift)         # add-on (1: off)
    noise = {k: torch.randn(x0.shape, generator=g) for k in ("eps", "eps_fake", "eps_real")}
    paired = torch.zeros(B, dtype=torch.bool)                                 # [B]
    if cfg.pair_weight and (not cfg.pair_steps or step < cfg.pair_steps):     # add-on: pairs
        paired = addons.draw_pairs(t, noise["eps"], data["seed"], cfg.pair_share, g)
    noise = {k: world.rows(x).to(device) for k, x in noise.items()}          # [B / ranks, C, h, w]
    rows = [world.rows(x).to(device) for x in (x0, data["context"], data["pooled"], t, t_hat)]
    known = world.rows(data["extra"]).to(device) if "extra" in data else None
    return Batch(*rows, **noise, known=known, paired=world.rows(paired).to(device), generator=g)


@dataclass
class StepSettings:
    """How both steps run: precision and clipping, several processes, and the add-ons' settings
    (all off: plain LADD)."""
    amp: torch.dtype = torch.float32   # autocast dtype (fp32: none)
    grad_clip: float = 1.0             # both gradients clipped to this norm
    world: training.World = field(default_factory=training.World)  # torchrun's processes
    pair_weight: float = 0.0           # add-on: DMD's pairs (0: off)
    distill: addons.Distill = None     # add-on: ADD's distillation loss (None: off)
    r1_weight: float = 0.0             # add-on: R1 on the heads (0: off)
    consistency: addons.Consistency = None  # add-on: consistency on the teacher's path (None: off)
    dmd: addons.DMD = None             # add-on: distribution matching, its fake score (None: off)


# ----------------------------------------------------------------------------------------------
# the two players' steps


def student_step(student, teacher, heads, opt, b, s=StepSettings()):
    """One student update -> (the teacher's features of the fake batch, one map per head,
    detached and fp32 for heads_step; statistics). The teacher comes frozen (requires_grad off)
    but runs with autograd on, so the heads' verdict flows back through it into the student; the
    heads only judge here: requires_grad_(False) for the step (no .grad), (True) after it. The
    forward passes run under training.autocast(device, s.amp); the student and the teacher read
    b.input(x). The loss: hinge_student_loss of every head's logits, plus weight * value for each
    (name, value, weight) of addons.student_terms(teacher, x0_hat, fake, b, s). The update:
    training.clip_grad_norm(student.parameters(), s.grad_clip), then opt.step() only if that norm
    is finite. Statistics (Python numbers): student_loss (the hinge loss alone), each add-on's
    unweighted value under its name, student_grad_norm (before clipping), student_skipped (1 when
    that norm is not finite and no step was taken, else 0)."""
    heads.requires_grad_(False)
    with training.autocast(b.x0.device, s.amp):
        x_t = flow.add_noise(b.x0, b.eps, b.t)                                    # [B, C, h, w]
        v = student(b.input(x_t), b.t, b.context, b.pooled).float()             # [B, C, h, w]
        x0_hat = flow.x0_from_v(x_t, v, b.t)                                      # [B, C, h, w]
        fake = flow.add_noise(x0_hat, b.eps_fake, b.t_hat)                       # [B, C, h, w]
        features = teacher.features(b.input(fake), b.t_hat, b.context, b.pooled,
                                    heads.blocks)                                 # [B, D, h/p, w/p] each
        logits = heads([f.float() for f in features], b.t_hat, b.pooled)         # [B] each
        loss = hinge_student_loss(logits)
        stats = {"student_loss": loss.item()}
        for name, value, weight in addons.student_terms(teacher, x0_hat, fake, b, s):  # none: LADD
            loss, stats[name] = loss + weight * value, value.item()
    opt.zero_grad(set_to_none=True)
    loss.backward()                    # heads -> frozen teacher -> x0_hat -> student
    norm = training.clip_grad_norm(student.parameters(), s.grad_clip)
    if torch.isfinite(norm):           # a NaN or inf gradient (or loss) skips the step
        opt.step()
    heads.requires_grad_(True)
    stats.update(student_grad_norm=norm.item(), student_skipped=int(not torch.isfinite(norm)))
    return [f.detach().float() for f in features], stats


def heads_step(teacher, heads, opt, b, fake_features, s=StepSettings()):
    """One heads update -> statistics. Real: x0 noised to t_hat with its own noise, judged through
    the teacher without autograd. Fake: student_step's features of x0_hat at the same t_hat
    (reused: the teacher is not run twice on the same input). `heads` may be DDP-wrapped."""
    B, blocks = len(b.x0), getattr(heads, "module", heads).blocks
    with torch.no_grad(), training.autocast(b.x0.device, s.amp):
        real = flow.add_noise(b.x0, b.eps_real, b.t_hat)                         # [B, C, h, w]
        real_features = teacher.features(b.input(real), b.t_hat, b.context, b.pooled,
                                         blocks)                                  # [B, D, h/p, w/p] each
    features = [torch.cat([r.float(), f])                                        # [2B, D, h/p, w/p]
                for r, f in zip(real_features, fake_features)]
    with training.autocast(b.x0.device, s.amp):
        logits = heads(features, b.t_hat.repeat(2), b.pooled.repeat(2, 1))       # [2B] each
        real_logits, fake_logits = [l[:B] for l in logits], [l[B:] for l in logits]
        loss = hinge_heads_loss(real_logits, fake_logits)
        stats = {"heads_loss": loss.item()}
        for name, value, weight in addons.heads_terms(heads, [f[:B] for f in features], b, s):
            loss, stats[name] = loss + weight * value, value.item()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = training.clip_grad_norm(heads.parameters(), s.grad_clip)
    if torch.isfinite(norm):           # a NaN or inf gradient (or loss) skips the step
        opt.step()
    stats.update(heads_grad_norm=norm.item(), heads_skipped=int(not torch.isfinite(norm)),
                 logit_real=torch.stack([l.mean() for l in real_logits]).mean().item(),
                 logit_fake=torch.stack([l.mean() for l in fake_logits]).mean().item())
    return stats


# ----------------------------------------------------------------------------------------------
# the loop


def train(cfg):  # pragma: no mutate block (the harness: tests/test_train_ladd.py)
    started = time.time()
    cfg, schedule = ladd_run.check_config(cfg)
    world, device = training.init_world(cfg.device, cfg.batch_size)  # torchrun: several processes
    amp = cli.pick_dtype(cfg.dtype, device)

    # the models: the frozen teacher, the student (its copy), the heads on its blocks, the EMA
    teacher_pipe = ladd_run.load_teacher(cfg, device, amp)
    teacher = teacher_pipe.model.requires_grad_(False)
    sizes, judge_sizes = ladd_run.check_sizes(cfg, teacher_pipe)
    describe, take = ladd_data.prompt_source(cfg, teacher_pipe)
    student = ladd_run.make_student(cfg, teacher).to(device)
    heads = Discriminator.for_teacher(teacher.config, cfg.disc_blocks, cfg.disc_hidden).to(device)
    ema = ladd_run.make_ema(cfg, student, teacher, world, device)
    ladd_run.speed_up(cfg, device, student, teacher)  # gradient checkpointing, torch.compile
    settings = StepSettings(amp, cfg.grad_clip, world, cfg.pair_weight,
                            ladd_run.distill_settings(cfg, take, teacher_pipe, device), cfg.r1_weight,
                            *ladd_run.few_step_settings(cfg, take, teacher_pipe, student, schedule, device))
    sharded = cfg.shard and world.size > 1  # several processes: DDP, or FSDP for student and EMA
    trained_student, trained_heads = world.wrap(student, device, sharded), world.wrap(heads, device)
    if sharded:
        world.wrap(ema, device, shard=True)
    opt_student = training.make_optimizer([p for p in student.parameters() if p.requires_grad],
                                          cfg.lr, (0.9, 0.99), device, cfg.optim_dtype)
    opt_heads = training.make_optimizer(heads.parameters(), cfg.disc_lr, (0.0, 0.99), device)
    run = ladd_run.RunFolder(cfg, world, sharded, teacher_pipe, schedule, sizes,
                             student, ema, heads, opt_student, opt_heads, settings.dmd)
    start, skipped = run.restore() if cfg.resume else (0, {"student": 0, "heads": 0})
    student_pipe = run.start()
    ladd_run.describe(cfg, teacher, student, heads, device, amp, world, sharded)

    try:  # generated once, then read from the cache (an interrupted generation continues)
        dataset = ladd_data.build_dataset(cfg, teacher_pipe, describe, take, sizes, world)
    except KeyboardInterrupt:
        run.save_if_new(start, skipped)
        raise training.interrupted("train_ladd.py", cfg.out, start) from None
    data_minutes = (time.time() - started) / 60
    grid = ladd_run.grid_prompts(cfg, take, teacher_pipe)
    run.open_log(start, device)
    t0, seen, step = time.time(), 0, start
    bar = tqdm(range(start, cfg.steps), desc="ladd", initial=start, total=cfg.steps,
               dynamic_ncols=True, disable=not world.main)
    with training.finish_step_on_interrupt() as interrupt:  # Ctrl-C: finish the step, save
        for step in bar:
            batch = draw_batch(cfg, dataset, schedule, step, world, device)
            fake_features, stats = student_step(trained_student, teacher, heads, opt_student,
                                                batch, settings)
            stats.update(heads_step(teacher, trained_heads, opt_heads, batch, fake_features, settings))
            skipped["student"] += stats.pop("student_skipped")
            skipped["heads"] += stats.pop("heads_skipped")
            training.ema_update(ema, student, min(cfg.ema, (1 + step) / (cfg.ema_warmup + step)))
            if cfg.memory_report and step == start:
                run.memory_report(teacher, amp, device)
            seen += len(batch.x0) * world.size
            if step % cfg.log_every == 0 or step == cfg.steps - 1:
                stats = world.mean(stats)
                run.log_step(step, stats, skipped, batch, seen / (time.time() - t0))
                bar.set_postfix(heads=f"{stats['heads_loss']:.2f}", student=f"{stats['student_loss']:.2f}",
                                real=f"{stats['logit_real']:.2f}", fake=f"{stats['logit_fake']:.2f}",
                                refresh=False)
            if cfg.grid_every and step % cfg.grid_every == 0:
                run.grid(student_pipe, grid, f"grid_{step:06d}.png")
            if cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0:
                run.save(step + 1, skipped)
            if cfg.max_minutes and not world.all_true(time.time() - t0 <= 60 * cfg.max_minutes):
                print(f"stopping after {cfg.max_minutes} minutes at step {step + 1}")
                break
            if not world.all_true(not interrupt.requested):
                run.save(step + 1, skipped)
                raise training.interrupted("train_ladd.py", cfg.out, step + 1)
    step = step + 1 if cfg.steps > start else start
    run.save(step, skipped)
    extra = {"data_minutes": f"{data_minutes:.1f}", "train_minutes": f"{(time.time() - t0) / 60:.1f}",
             "skipped_steps": json.dumps(skipped)}
    run.grid(student_pipe, grid, "grid.png")
    extra.update(run.judge(student_pipe, judge_sizes, step))  # the shapes world's judge
    run.close_log()
    run.save(step, skipped, **extra)
    print(f"student: {cfg.out}/model.safetensors (grid: {cfg.out}/grid.png; skipped steps: "
          f"{skipped}); {(time.time() - started) / 60:.1f} min in all, {data_minutes:.1f} of them "
          f"for data")
    return student_pipe


def main(argv=None):  # pragma: no mutate block
    return cli.training_main(Config, PRESETS, train, argv, "train_ladd.py", __doc__,
                             may_change=MAY_CHANGE)


if __name__ == "__main__":
    main()

"""
Everything around train_ladd.py's loop that is not the method: its options checked before any
work, the models made (student, EMA), the run folder (config, log, weights and the state a run
resumes from), comparison grids and the judge at the end. Plumbing a learner may take on trust.
"""

import dataclasses
import json
import math
import os

import numpy as np
import torch
from tqdm import tqdm

import addons
import cli
import editing
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

OPTION_RULES = {  # cli.check_options: each numeric option and what it allows
    "data_size": cli.AT_LEAST_1, "batch_size": cli.AT_LEAST_1, "disc_hidden": cli.AT_LEAST_1,
    "log_every": cli.AT_LEAST_1, "ema_warmup": cli.AT_LEAST_1, "steps": cli.COUNT,
    "warmup": cli.COUNT, "data_steps": cli.COUNT, "grid_every": cli.COUNT,
    "ckpt_every": cli.COUNT, "judge_n": cli.COUNT, "data_cfg": cli.NON_NEGATIVE,
    "lr": cli.POSITIVE, "disc_lr": cli.POSITIVE, "t_hat_std": cli.POSITIVE,
    "grad_clip": cli.POSITIVE, "t_hat_mean": cli.FINITE, "distill_weight": cli.NON_NEGATIVE,
    "r1_weight": cli.NON_NEGATIVE, "max_minutes": cli.NON_NEGATIVE, "ema": cli.DECAY,
    "lora": cli.COUNT, "lora_alpha": cli.NON_NEGATIVE, "pair_weight": cli.NON_NEGATIVE,
    "pair_share": cli.SHARE, "pair_steps": cli.COUNT, "seed": cli.SEED,
    "consistency_weight": cli.NON_NEGATIVE, "dmd_weight": cli.NON_NEGATIVE,
    "one_step_t_hat_shift": cli.POSITIVE}


# ----------------------------------------------------------------------------------------------
# options


def check_config(cfg):
    """Every option's value checked before any work -> (cfg with the shipped teacher filled in,
    the student's schedule: times, their probabilities, the warm-up's)."""
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
    check_edit_options(cfg)
    for name in ("consistency_weight", "dmd_weight"):
        if getattr(cfg, name) and (cfg.task != "t2i" or cfg.shard):
            raise ValueError(f"--{name.replace('_', '-')}: text-to-image in one process group "
                             f"without --shard only; pass --{name.replace('_', '-')} 0 with it")
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
    training.check_writable(cfg, "out", "data_dir")  # last: it makes (and removes) a file in each
    if not cfg.teacher:  # the shipped shapes teacher of the task
        cfg = dataclasses.replace(cfg, teacher=os.path.join("assets", training.SHIPPED[cfg.task]))
    return cfg, (times, probs, warm)


def check_edit_options(cfg):
    """--task edit: its prompts are its edits' instructions, and ADD's distillation target (the
    teacher guided by text alone) would leave out the editing teacher's image guidance."""
    if cfg.task != "edit":
        return
    for name in ("prompts", "cond"):
        if getattr(cfg, name):
            raise ValueError(f"--{name} {getattr(cfg, name)}: --task edit trains on the "
                             f"instructions of shapes-world edits (editing.task_of); leave "
                             f"--{name} out")
    if cfg.distill_weight:
        raise ValueError(f"--distill-weight {cfg.distill_weight:g}: its target is the teacher "
                         f"guided by text alone, without the editing teacher's image guidance; "
                         f"pass --distill-weight 0 with --task edit")


def check_sizes(cfg, pipe):
    """--data-sizes and --judge-sizes -> (the student's sizes: the data's, default the teacher's;
    the judge's sizes, None: the student's), each checked against the teacher's patch, VAE factor
    and positional grid; and --batch-size against the data's size buckets."""
    def parse(name):
        text, option = getattr(cfg, name), "--" + name.replace("_", "-")
        if not text:
            return None
        if cfg.task != "t2i":
            raise ValueError(f"{option}: --task {cfg.task} uses the teacher's sizes; leave it out")
        sizes = metrics.parse_sizes(text, option)
        for w, h in sizes:
            try:
                pipeline.check_size(pipe, w, h)
            except ValueError as e:
                raise ValueError(f"{option} {text}: {e}") from None
        return sizes
    judge = parse("judge_sizes")
    sizes = parse("data_sizes") or pipe.sizes
    check_batch(cfg, sizes)
    return sizes, judge


def check_batch(cfg, sizes):
    """A batch is distinct rows of one size bucket: --batch-size may not exceed a bucket."""
    bucket = ladd_data.bucket_size(cfg.data_size, sizes)
    if cfg.batch_size > bucket and cfg.resume:  # a run made before this check drew `bucket` rows
        raise ValueError(f"--resume {cfg.resume}: its --batch-size {cfg.batch_size} is more than "
                         f"the {bucket} latents of each size bucket, so its steps trained on "
                         f"{bucket}; start it again with --overwrite --batch-size {bucket}")
    if cfg.batch_size > bucket:
        raise ValueError(f"--batch-size {cfg.batch_size}: each size bucket holds {bucket} latents "
                         f"(--data-size {cfg.data_size} over {len(sizes)} sizes) and a batch is "
                         f"drawn from one bucket; pass --batch-size {bucket} or less, or "
                         f"--data-size {cfg.batch_size * len(sizes)} or more")


# ----------------------------------------------------------------------------------------------
# models


def load_teacher(cfg, device, amp):
    """The teacher's pipeline (MMDiT, VAE, text encoder, sampling defaults), frozen, checked
    against --task and --data. On CUDA it is stored in the autocast dtype: it is never updated,
    only run and differentiated through."""
    pipe = pipeline.load_pipeline(cfg.teacher, device, amp if device.type == "cuda" else torch.float32)
    check_task(pipe, cfg.task, cfg.teacher)
    if cfg.data == "real" and not pipeline.is_shapes(pipe):
        raise ValueError(f"--data real renders shapes-world captions, and --teacher {cfg.teacher} "
                         f"is not a shapes world model; pass --data synthetic (its own samples)")
    if not cfg.cond and isinstance(pipe.text_encoder, pipeline.UnavailableTextEncoder):
        pipe.text_encoder.encode([""])  # raises why prompts cannot be encoded, before any writing
    return pipe


def check_task(pipe, task, teacher):
    """The teacher (file name `teacher`) fits --task: an editing model of the shapes world for
    edit and only for edit; inpainting.check_task for t2i and inpaint."""
    c = pipe.model.config
    if editing.is_edit_model(pipe.model):
        if task != "edit":
            raise ValueError(f"--teacher {teacher} is an editing model (latent and source latent "
                             f"in); pass --task edit")
        if not pipeline.is_shapes(pipe):
            raise ValueError(f"--task edit makes its data in the shapes world (rendered edits); "
                             f"--teacher {teacher} is not a shapes-world model")
    elif task == "edit":
        raise ValueError(f"--task edit needs an editing teacher, and --teacher {teacher} is not "
                         f"one (it reads {c.in_channels} input channels for {c.out_channels} "
                         f"latent channels, an editing model {2 * c.out_channels}); make one with "
                         f"python train_teacher.py --preset edit")
    else:
        inpainting.check_task(pipe, task, teacher)


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


def make_ema(cfg, student, teacher, world, device):
    """The student's EMA, frozen, starting equal to it (a LoRA EMA shares the teacher's tensors)."""
    ema = (make_student(cfg, teacher) if cfg.lora else
           mmdit.MMDiT(student.config).to(device)).requires_grad_(False)
    load_trained(ema, trained_state(student, world), world)
    return ema


def trained_state(model, world):
    """What a checkpoint keeps of the student (or its EMA): all weights, or a LoRA model's
    adapters (its base is the teacher file)."""
    return lora.adapter_state(model) if lora.is_lora(model) else world.state(model)


def load_trained(model, state, world):
    """The inverse of trained_state."""
    if lora.is_lora(model):
        return lora.load_adapter_state(model, state)
    return world.load(model, state)


def speed_up(cfg, device, student, teacher):
    """Gradient checkpointing (default: on CUDA) and torch.compile, as the options say."""
    on = cfg.checkpointing == "on" or (cfg.checkpointing == "auto" and device.type == "cuda")
    student.gradient_checkpointing = teacher.gradient_checkpointing = on
    if cfg.compile:
        student.compile_blocks()
        teacher.compile_blocks()


def distill_settings(cfg, take, teacher_pipe, device):
    """The distillation add-on's settings (None when --distill-weight is 0)."""
    if not cfg.distill_weight:
        return None
    u = take([0])[0]  # its uncond_* are the empty prompt's
    return addons.Distill(cfg.distill_weight, u.uncond_context.to(device),
                          u.uncond_pooled.to(device), teacher_pipe.defaults["cfg"])


def guide(take, teacher_pipe, device):
    """The teacher's guidance for the add-ons that run it guided: the empty prompt and its scale."""
    u = take([0])[0]  # its uncond_* are the empty prompt's
    return addons.Guide(u.uncond_context.to(device), u.uncond_pooled.to(device),
                        teacher_pipe.defaults["cfg"])


def few_step_settings(cfg, take, teacher_pipe, student, schedule, device):
    """The 1-2 step add-ons' settings -> (Consistency or None, DMD or None)."""
    if not (cfg.consistency_weight or cfg.dmd_weight):
        return None, None
    g = guide(take, teacher_pipe, device)
    return (addons.Consistency(cfg.consistency_weight, student, schedule[0], g)
            if cfg.consistency_weight else None,
            addons.DMD(cfg.dmd_weight, teacher_pipe.model, g) if cfg.dmd_weight else None)


def describe(cfg, teacher, student, heads, device, amp, world, sharded):
    """One line on the models and the run (and a note when the EMA's ramp outlasts it)."""
    trained = sum(p.numel() for p in student.parameters() if p.requires_grad)
    print(f"student {mmdit.count_params(student) / 1e6:.2f}M"
          f"{f' (LoRA rank {cfg.lora}: {trained / 1e6:.3f}M trained)' if cfg.lora else ''}, teacher "
          f"{mmdit.count_params(teacher) / 1e6:.2f}M, {len(heads.blocks)} heads "
          f"{mmdit.count_params(heads) / 1e6:.2f}M; {cfg.steps} steps of {cfg.batch_size} on "
          f"{device} ({amp}) x {world.size} process(es){' (FSDP)' * sharded}")
    ramp_ends = math.ceil((cfg.ema * cfg.ema_warmup - 1) / (1 - cfg.ema))
    if cfg.ema_warmup > 1 and ramp_ends > cfg.steps:
        print(f"EMA: decay ramps as (1 + s) / ({cfg.ema_warmup} + s), below --ema {cfg.ema} until "
              f"step {ramp_ends} (--ema-warmup 1: constant)")


# ----------------------------------------------------------------------------------------------
# the run folder


def student_sampler(cfg, times):
    """The student's sampling defaults in its checkpoint: its times, unguided (an editing
    student: no image guidance either, one pass per step)."""
    return {"times": times, "cfg": 1.0, "sampler": cfg.sampler,
            **({"image_cfg": 1.0} if cfg.task == "edit" else {})}


class RunFolder:
    """A LADD run's files in cfg.out: config.json, log.jsonl, vae.safetensors, the student
    (model.safetensors: the EMA, what is sampled; student.safetensors: the raw weights; with
    LoRA the merged EMA and adapters.safetensors), state.safetensors (what --resume reads) and
    the comparison grids. Rank 0 writes; with FSDP every rank takes part in gathering."""

    def __init__(self, cfg, world, sharded, teacher_pipe, schedule, sizes,
                 student, ema, heads, opt_student, opt_heads, addon=None):
        self.cfg, self.world, self.sharded, self.addon = cfg, world, sharded, addon
        self.teacher_pipe, self.schedule, self.sizes = teacher_pipe, schedule, sizes
        self.student, self.ema, self.heads = student, ema, heads
        self.opt_student, self.opt_heads = opt_student, opt_heads
        self.state_path = os.path.join(cfg.out, "state.safetensors")
        self.grid_cache, self.log = {}, None

    def restore(self):
        """Load the saved state -> (step, skipped steps). cli.resolve_config checked it is there."""
        state, w = weights.load_state(self.state_path), self.world
        load_trained(self.student, state["student"], w)
        load_trained(self.ema, state["ema"], w)
        w.load(self.student, state["opt_g"], self.opt_student)
        self.heads.load_state_dict(state["disc"])
        self.opt_heads.load_state_dict(state["opt_d"])
        if self.addon is not None:  # an add-on's own models (DMD's fake score)
            self.addon.load_state_dict(state["addon"])
        skipped = state["skipped"]
        skipped = {"student": skipped.get("student", skipped.get("g")),  # runs saved as g / d
                   "heads": skipped.get("heads", skipped.get("d"))}
        print(f"resumed {self.cfg.out} at step {state['step']}")
        return state["step"], skipped

    def start(self):
        """config.json and the VAE (--overwrite first clears the folder) -> the student's
        pipeline: the EMA with the teacher's text encoder and VAE, sampling at its times."""
        if self.world.main:
            training.start_run(self.cfg)
            self.teacher_pipe.vae.save_pretrained(os.path.join(self.cfg.out, "vae.safetensors"))
        return pipeline.Pipeline(
            model=self.ema, text_encoder=self.teacher_pipe.text_encoder, vae=self.teacher_pipe.vae,
            defaults={**student_sampler(self.cfg, self.schedule[0]), "steps": len(self.schedule[0])},
            sizes=self.sizes, path=self.cfg.out)

    def save(self, step, skipped, **extra):
        """Weights first, then the state that points past them; each file written atomically."""
        if not (self.world.main or self.sharded):
            return
        w, cfg = self.world, self.cfg
        tree = {"student": trained_state(self.student, w), "ema": trained_state(self.ema, w),
                "disc": self.heads.state_dict(), "opt_g": w.state(self.student, self.opt_student),
                "opt_d": self.opt_heads.state_dict(), "step": step, "skipped": skipped}
        if self.addon is not None:
            tree["addon"] = self.addon.state_dict()
        if not w.main:
            return
        meta = training.checkpoint_metadata(
            "train_ladd.py", cfg, pipeline.text_encoder_spec(self.teacher_pipe, cfg.out), "vae.safetensors",
            student_sampler(cfg, self.schedule[0]), self.sizes,
            teacher=os.path.abspath(self.teacher_pipe.path), train_steps=str(step), **extra)
        if cfg.lora:  # the EMA merged into the teacher's weights, and its adapters alone
            self.ema.save_pretrained(os.path.join(cfg.out, "model.safetensors"), meta,
                                     lora.merged_state(self.ema))
            lora.save_adapters(self.ema, os.path.join(cfg.out, "adapters.safetensors"), meta)
        else:
            self.ema.save_pretrained(os.path.join(cfg.out, "model.safetensors"), meta, tree["ema"])
            self.student.save_pretrained(os.path.join(cfg.out, "student.safetensors"), meta,
                                         tree["student"])
        weights.save_state(tree, self.state_path)

    def save_if_new(self, step, skipped):
        """A run stopped before its first save keeps a state to resume from."""
        if not os.path.isfile(self.state_path):
            self.save(step, skipped)

    def open_log(self, start, device):
        """log.jsonl on rank 0, without the records past the resumed step; and the CUDA
        peak-memory counter reset, so --memory-report measures the loop."""
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if self.world.main:
            self.log = training.open_log(os.path.join(self.cfg.out, "log.jsonl"),
                                         keep=lambda record: record["step"] < start)

    def write_log(self, record):
        if self.log:
            self.log.write(json.dumps(record) + "\n")
            self.log.flush()

    def log_step(self, step, stats, skipped, batch, samples_per_s):
        """One log.jsonl line: the step's statistics (averaged over ranks), skips, size, speed."""
        self.write_log({"step": step, **{k: round(v, 5) for k, v in stats.items()},
                        "skipped": dict(skipped), "size": list(batch.x0.shape[-2:]),
                        "samples_per_s": round(samples_per_s, 2)})

    def close_log(self):
        if self.log:
            self.log.close()

    def memory_report(self, teacher, amp, device):
        if self.world.main:
            tqdm.write(training.memory_report(
                teacher, self.student, self.ema, self.heads, self.opt_student, self.opt_heads,
                device, self.world.size if self.sharded else 1,
                teacher_dtype=amp if device.type == "cuda" else torch.float32)[1])  # load_teacher's

    def grid(self, student_pipe, prompts, name):
        """A comparison grid (rank 0 writes; a sharded EMA needs every rank to sample)."""
        if self.world.main or self.sharded:
            comparison_grid(self.teacher_pipe, student_pipe, prompts,
                            self.world.main and os.path.join(self.cfg.out, name), self.grid_cache)

    def judge(self, student_pipe, judge_sizes, step):
        """The shapes world's judge of the student at its steps, and (text-to-image, editing) at
        2 and 1 steps -> the checkpoint metadata's entries; printed, and a log.jsonl record."""
        cfg, n = self.cfg, len(self.schedule[0])
        if not (self.world.main or self.sharded) or not cfg.judge_n \
                or not pipeline.is_shapes(self.teacher_pipe):
            return {}
        main = self.world.main
        scores = judge_student(cfg, student_pipe, judge_sizes, progress=main)
        print(f"student, {n} steps, {'edits ' * (cfg.task != 't2i')}judged:", json.dumps(scores))
        record, extra = {"step": step, "judge": scores}, {"judge": json.dumps(scores)}
        if cfg.task in ("t2i", "edit"):  # the same student with fewer steps: times 1, .5 and 1
            fewer = {}
            for k in [k for k in (2, 1) if k < n]:
                fewer[k] = judge_student(cfg, student_pipe, judge_sizes, steps=k)
                print(f"student, {k} step{'s' * (k > 1)}, judged: " + ", ".join(
                    f"{name} {fewer[k][name]}" for name in JUDGE_SUMMARY[cfg.task]))
            record["judge_fewer_steps"] = fewer
            extra["judge_fewer_steps"] = json.dumps(fewer)
        self.write_log(record)
        return extra


JUDGE_SEED = 1234  # the judge's captions (t2i) and edits (edit): off the data's streams (seed 0)
JUDGE_SUMMARY = {"t2i": ("all_correct", "purity"), "edit": ("followed", "preserved", "both")}


def judge_student(cfg, student_pipe, judge_sizes, progress=False, **settings):
    """The shapes world's judge of the student for --task: captions (t2i), inpainting edits or
    instruction edits -> mean scores. settings: sampling overrides (steps)."""
    if cfg.task == "inpaint":
        return metrics.judge_edits(student_pipe, cfg.judge_n, progress=progress, **settings)
    if cfg.task == "edit":
        return editing.evaluate(student_pipe, cfg.judge_n, seed=JUDGE_SEED, progress=progress,
                                **settings)[0]
    return metrics.judge_pipeline(student_pipe, cfg.judge_n, seed=JUDGE_SEED, sizes=judge_sizes,
                                  progress=progress, **settings)


# ----------------------------------------------------------------------------------------------
# comparison grids


def grid_prompts(cfg, take, teacher_pipe):
    """Six fixed prompts outside the data (for inpainting and editing: six fixed edits)."""
    if cfg.task == "edit":
        return [editing.task_of(99, i, *teacher_pipe.sizes[0]) for i in range(6)]
    if cfg.task == "inpaint":
        w, h = teacher_pipe.sizes[0]
        return [inpainting.edit_task(np.random.default_rng([99, i]), w, h) for i in range(6)]
    return take(list(range(10_000_000, 10_000_006)))


def comparison_grid(teacher_pipe, student_pipe, grid, path, cache):
    """Rows: teacher at its default (guided) steps | teacher 4 steps | student 4 | student 1;
    the same prompts and seeds in every column. The teacher rows are computed once (cache).
    grid: (Conditioning, captions), or for inpainting a list of inpaint.edit_task edits (then
    a first row shows the input with its mask), or for editing a list of editing.EditTask (then
    the first rows show the source and the target; edit i from the noise of seed i). Sampled at
    the run's first size (the student's), which may not be the teacher's default (a diffusers
    SD3 folder says 1024x1024)."""
    w, h = student_pipe.sizes[0]
    d = teacher_pipe.defaults
    guidance, first = f"cfg {d['cfg']:g}", {}
    if isinstance(grid, list) and isinstance(grid[0], editing.EditTask):  # instruction edits
        pairs = [task.render() for task in grid]
        first = {"source": torch.stack([p[0] for p in pairs]),                  # [6, 3, H, W]
                 "target": torch.stack([p[1] for p in pairs])}
        guidance += f", image cfg {editing.edit_settings(teacher_pipe)['image_cfg']:g}"

        def run(pipe, steps=None):
            return editing.edit(pipe, first["source"], [t.instruction.text for t in grid],
                                steps=steps, seed=0)                             # [6, 3, H, W]
    elif isinstance(grid, list):  # inpainting edits: (image, mask, caption) each
        first = {"input, mask grey": torch.stack([torch.where(m > 0, 0.0, im) for im, m, _ in grid])}

        def run(pipe, steps=None):
            return torch.cat([inpainting.inpaint(pipe, image, mask, [caption], steps=steps, seed=i)
                              for i, (image, mask, caption) in enumerate(grid)])
    else:
        def run(pipe, steps=None):
            return pipeline.generate(pipe, grid[0], w, h, steps=steps, seed=0, progress=False)
    if not cache:
        cache.update(first)
        cache[f"teacher {d['steps']} steps, {guidance}"] = run(teacher_pipe)
        cache[f"teacher 4 steps, {guidance}"] = run(teacher_pipe, 4)
    rows = dict(cache)
    rows["student 4 steps"] = run(student_pipe, 4)
    rows["student 1 step"] = run(student_pipe, 1)
    if path:  # no path: this rank helps a sharded student sample, rank 0 writes
        images.save_strip(list(rows.values()), path, labels=list(rows))

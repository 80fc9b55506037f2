"""
Benchmarks, measured side by side in one run (ratios, not absolute targets, are what to compare).

    python bench.py mmdit --config sd3-medium --depth 2 --size 256x256 --backward
    python bench.py sample                             # teacher (28 guided steps) vs 4 and 1 steps
    python bench.py ladd --config shapes --batch 32    # one LADD step: time, peak memory
    python bench.py vae                                # tiled vs untiled VAE decode: peak memory, time
    python bench.py gpu-check                          # what a session with a GPU runs: < 8 min, H100

mmdit: forward (and with --backward forward+backward) of an MMDiT of a named config, random
weights, median of a few timed iterations after warm-up; image tokens/s and TFLOP/s from a FLOP
count of the config (`mmdit_flops`), on CUDA also the share of the card's matmul peak measured in
the same run. tests/bench_diffusers.py (a development tool: requirements-dev.txt) adds diffusers'
SD3Transformer2DModel with the same weights, iterations interleaved, so both see the same machine
load; --compile times the
model with torch.compile'd blocks (MMDiT.compile_blocks) beside the eager one.
sample: end to end (text encoding, sampling, VAE decode) images/s of a checkpoint at its default
(guided, many-step) setting vs 4 and 1 unguided steps; a student has the teacher's architecture,
so without --student the teacher at 4 and 1 unguided steps runs exactly at the student's speed.
ladd, vae: each case runs in a fresh subprocess, so one case's peak memory cannot hide another's:
on CUDA torch.cuda.max_memory_allocated, on the CPU the process's peak resident memory (ru_maxrss).
Sizes are image pixels (WIDTHxHEIGHT); the latent is smaller by the config's VAE factor. Weights
are random everywhere: time and memory do not depend on the values.
"""

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

import lora
import mmdit
import shapes
import vae as vae_lib
from cli import DTYPES, Parser, one_line, pick_device, pick_dtype, run_cli
from training import memory_report, rss_peak_bytes

HERE = os.path.dirname(os.path.abspath(__file__))
DTYPE_CHOICES = ("auto", *DTYPES)
# mmdit config -> (VAE config of its latents, text tokens per prompt, default image size W, H);
# a config not listed here is treated like sd3 (16 latent channels) or shapes (otherwise)
SETTINGS = {
    "sd3-medium": ("sd3", 154, (1024, 1024)),     # SD3: 77 CLIP + 77 T5 tokens
    "sd3.5-medium": ("sd3", 154, (1024, 1024)),
    "sd3.5-large": ("sd3", 154, (1024, 1024)),
    "shapes": ("shapes", shapes.MAX_WORDS, (64, 64)),
    "test": ("shapes", 7, (16, 16)),
}


# ----------------------------------------------------------------------------------------------
# shared pieces: configs and sizes, random models, timing, tables


def settings(name, config):
    return SETTINGS.get(name) or (SETTINGS["sd3-medium"] if config.in_channels == 16
                                  else SETTINGS["shapes"])


def model_config(name, depth=None):
    """A named MMDiT config, optionally with fewer (or more) blocks (MMDiT-X's dual-attention
    blocks are kept where they still fit)."""
    config = mmdit.CONFIGS[name]
    if depth is None or depth == config.depth:
        return config
    return dataclasses.replace(config, depth=depth, dual_attention_layers=tuple(
        i for i in config.dual_attention_layers if i < depth - 1))


def latent_size(name, config, size):
    """Image (width, height) in pixels -> latent (height, width), or a one-line error."""
    W, H = size
    f = vae_lib.CONFIGS[settings(name, config)[0]].factor
    g, biggest = f * config.patch_size, f * config.patch_size * config.pos_embed_max_size
    if W % g or H % g or not (g <= W <= biggest and g <= H <= biggest):
        raise ValueError(f"--size {W}x{H}: for {name}, width and height must be multiples of {g} "
                         f"(VAE factor {f} x patch size {config.patch_size}) from {g} to {biggest}")
    return H // f, W // f


def parse_size(text):
    """'256x256' (or '256') -> (256, 256): width, height in pixels."""
    parts = text.lower().split("x")
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT in pixels, e.g. 256x256")
    return int(parts[0]), int(parts[1])


def positive(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def non_negative(text):
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return int(text)


def random_mmdit(config, device, dtype, std=0.02):
    """An MMDiT with N(0, std) weights, made directly on `device` in `dtype` (no fp32 copy on
    the CPU first: an SD3-size model appears on a GPU in a second)."""
    with torch.device("meta"):
        model = mmdit.MMDiT(config)
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.normal_(0.0, std)
    return model


def mmdit_inputs(config, batch, h, w, text_tokens, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, h, w, generator=g)           # [B, C, h, w] latents
    t = torch.rand(batch, generator=g)                                       # [B]
    context = torch.randn(batch, text_tokens, config.context_dim, generator=g)  # [B, L, Dc]
    pooled = torch.randn(batch, config.pooled_dim, generator=g)              # [B, Dp]
    return x.to(device, dtype), t.to(device), context.to(device, dtype), pooled.to(device, dtype)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def time_cases(cases, device, warmup, iters):
    """{name: fn} -> {name: median seconds of fn()}. Cases take turns, iteration by iteration,
    so a change in machine load hits them all alike, and the order rotates each iteration, so no
    case always runs right after the same other one (caches, allocator); warm-up is not timed."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    times = {name: [] for name in cases}
    names = list(cases)
    for i in range(iters):
        for name in names[i % len(names):] + names[:i % len(names)]:
            fn = cases[name]
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def defaults_for(a, default):
    """(warm-up, timed) iterations: the options where given, else `default`."""
    return (default[0] if a.warmup is None else a.warmup), (a.iters or default[1])


def markdown(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def describe(device, dtype):
    n = torch.get_num_threads()
    threads = f", {n} thread{'s' * (n > 1)}" if device.type == "cpu" else ""
    name = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    return f"{device}{name} {str(dtype).removeprefix('torch.')}{threads}"


def mib(n):
    return f"{n / 2 ** 20:,.0f}"


# ----------------------------------------------------------------------------------------------
# FLOPs: counted from the config; a multiply-add is 2 FLOPs


def mmdit_flops(config, image_tokens, text_tokens):
    """Forward FLOPs of one sample: every matmul (patch and text embedding, timestep and pooled
    embedders, each block's adaLN, q/k/v and output projections and MLP per stream, the joint
    attention's scores QK^T and weighted sum AV over the image + text sequence, MMDiT-X's
    image-only attention, the final layer). Norms, activations and softmax are not counted.
    Forward+backward is about 3x this (the backward computes two matmuls for each one)."""
    c, D, N, L = config, config.hidden_size, image_tokens, text_tokens
    hidden, p2 = int(D * c.mlp_ratio), c.patch_size ** 2

    def linear(tokens, fan_in, fan_out):
        return 2 * tokens * fan_in * fan_out

    def attention(tokens):  # QK^T and AV for all heads: 2 x 2 S^2 D
        return 4 * tokens * tokens * D

    flops = (linear(N, c.in_channels * p2, D)                      # patch embedding (a conv)
             + linear(1, 256, D) + linear(1, D, D)                 # timestep embedder
             + linear(1, c.pooled_dim, D) + linear(1, D, D)        # pooled-text embedder
             + linear(L, c.context_dim, D))                        # context embedder
    for i in range(c.depth):
        for tokens, pre_only, dual in ((L, i == c.depth - 1, False),         # context stream
                                       (N, False, i in c.dual_attention_layers)):  # image stream
            flops += linear(1, D, (2 if pre_only else 9 if dual else 6) * D)   # adaLN modulation
            flops += linear(tokens, D, 3 * D)                                  # q, k, v
            if not pre_only:
                flops += linear(tokens, D, D) + linear(tokens, D, hidden) + linear(tokens, hidden, D)
            if dual:
                flops += linear(tokens, D, 3 * D) + linear(tokens, D, D) + attention(tokens)
        flops += attention(N + L)                                            # joint attention
    flops += linear(1, D, 2 * D) + linear(N, D, p2 * c.out_channels)         # final layer
    return flops


def matmul_peak(device, dtype, n=8192, iters=10):
    """FLOP/s of the best of 5 runs of `iters` square n x n matmuls: the card's usable peak."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    out = torch.empty_like(a)
    for _ in range(3):
        torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            torch.mm(a, b, out=out)
        sync(device)
        best = min(best, (time.perf_counter() - t0) / iters)
    return 2 * n ** 3 / best


# ----------------------------------------------------------------------------------------------
# mmdit: our MMDiT (and diffusers' SD3 transformer) forward and forward+backward


def measure_mmdit(config, x, t, context, pooled, backward, warmup, iters, reference=None,
                  compile=False):
    """-> {(model, pass): median seconds}, model 'ours' (and 'ours, compiled', a reference's name),
    pass 'forward' (and 'forward+backward': loss = mean square of the output, gradients of every
    weight). reference(config, ours) -> (name, model, run(x, t, context, pooled)): another
    implementation holding the same weights (tests/bench_diffusers.py). Compiling happens in the
    warm-up, which is then at least one iteration."""
    ours = random_mmdit(config, x.device, x.dtype)
    models = {"ours": (ours, lambda: ours(x, t, context, pooled))}
    if compile:
        fast = random_mmdit(config, x.device, x.dtype)
        fast.load_state_dict(ours.state_dict())
        fast.compile_blocks()
        models["ours, compiled"] = (fast, lambda: fast(x, t, context, pooled))
        warmup = max(warmup, 1)
    if reference:
        name, ref, run_ref = reference(config, ours)
        models[name] = (ref, lambda: run_ref(x, t, context, pooled))
    cases = {}
    for name, (model, run) in models.items():
        def forward(run=run):
            with torch.no_grad():
                run()

        def forward_backward(model=model, run=run):
            run().float().square().mean().backward()
            model.zero_grad(set_to_none=False)  # keep the gradient memory: no page faults timed
        cases[name, "forward"] = forward
        if backward:
            cases[name, "forward+backward"] = forward_backward
    return time_cases(cases, x.device, warmup, iters)


def bench_mmdit(a, reference=None):
    """The mmdit table; reference: see measure_mmdit (its column: ours / its time)."""
    device = pick_device(a.device)
    dtype = pick_dtype(a.dtype, device)
    config = model_config(a.config, a.depth)
    _, text_tokens, default_size = settings(a.config, config)
    text_tokens = a.text_tokens or text_tokens
    W, H = a.size or default_size
    h, w = latent_size(a.config, config, (W, H))
    N = (h // config.patch_size) * (w // config.patch_size)
    cuda = device.type == "cuda"
    warmup, iters = defaults_for(a, (3, 10) if cuda else (1, 3))
    inputs = mmdit_inputs(config, a.batch, h, w, text_tokens, device, dtype)
    seconds = measure_mmdit(config, *inputs, a.backward, warmup, iters, reference, a.compile)
    ref = [m for m, _ in seconds if m not in ("ours", "ours, compiled")]
    peak = matmul_peak(device, dtype) if cuda else None
    flops = a.batch * mmdit_flops(config, N, text_tokens)

    with torch.device("meta"):
        params = mmdit.count_params(mmdit.MMDiT(config))
    print(f"MMDiT {a.config} (depth {config.depth}, {params / 1e6:,.1f} M params), {W}x{H} px = "
          f"{h}x{w} latent = {N} image + {text_tokens} text tokens, batch {a.batch}, "
          f"{describe(device, dtype)}; {flops / 1e12:.3g} TFLOP per forward, 3x that with the "
          f"backward; median of {iters} after {warmup} warm-up"
          + (f"; {str(dtype).removeprefix('torch.')} matmul peak of this card, measured now: "
             f"{peak / 1e12:.0f} TFLOP/s" if cuda else ""))
    header = ["model", "pass", "ms / iter", "image tokens / s", "TFLOP/s"]
    header += ["% of matmul peak"] * cuda + [f"ours / {name} time" for name in ref]
    rows = []
    for (model, kind), s in sorted(seconds.items(), key=lambda item: item[0][1] != "forward"):
        achieved = flops * (3 if kind == "forward+backward" else 1) / s
        row = [model, kind, f"{1000 * s:.1f}", f"{a.batch * N / s:,.0f}", f"{achieved / 1e12:.3g}"]
        if cuda:
            row.append(f"{100 * achieved / peak:.0f}")
        for name in ref:
            row.append(f"{s / seconds[name, kind]:.2f}" if model != name else "")
        rows.append(row)
    print(markdown(header, rows))
    return seconds


# ----------------------------------------------------------------------------------------------
# sample: end-to-end sampling speed, many guided steps vs 4 and 1


def bench_sample(a):
    from metrics import nfe_per_image
    from pipeline import check_size, generate, load_pipeline, sampling_settings
    device = pick_device(a.device)
    dtype = pick_dtype(a.dtype, device)
    teacher = load_pipeline(a.ckpt, device, dtype)
    fast = load_pipeline(a.student, device, dtype) if a.student else teacher
    W, H = a.size or teacher.sizes[0]
    check_size(teacher, W, H)
    check_size(fast, W, H)
    if isinstance(teacher.text_encoder, shapes.ShapesTextEncoder):
        prompts = [shapes.random_caption(np.random.default_rng([0, i])) for i in range(a.n)]
    else:
        prompts = ["a photograph of an astronaut riding a horse"] * a.n
    fast_name, fast_cfg = ("student", None) if a.student else ("teacher", 1.0)
    configs = [("teacher", teacher, {}),
               (fast_name, fast, {"steps": 4, "cfg": fast_cfg}),
               (fast_name, fast, {"steps": 1, "cfg": fast_cfg})]
    cases, labels = {}, {}
    for who, pipe, overrides in configs:
        s = sampling_settings(pipe, **overrides)
        guided = nfe_per_image(s) > s["steps"]
        label = (f"{who}, {s['steps']} step{'s' * (s['steps'] > 1)}, "
                 + (f"CFG {s['cfg']:g}" if guided else "unguided")
                 + (" (its default)" if not overrides else ""))
        labels[label] = (s["steps"], nfe_per_image(s))

        def run(pipe=pipe, overrides=overrides, steps=None):
            generate(pipe, prompts, W, H, seed=0, batch_size=a.n, progress=False,
                     **{**overrides, **({"steps": steps} if steps else {})})
        run(steps=1)  # warm-up, one step
        cases[label] = run
    seconds = time_cases(cases, device, 0, a.repeats)

    base = seconds[next(iter(seconds))]
    print(f"sampling {a.n} images of {W}x{H} in one batch, end to end (text encoding, sampling, "
          f"VAE decode), {describe(device, dtype)}, median of {a.repeats}; teacher {a.ckpt}"
          + (f", student {a.student}" if a.student else
             "; no --student: a LADD student has the teacher's architecture, so the teacher at 4 "
             "and 1 unguided steps runs at exactly the student's speed"))
    rows = [[label, steps, nfe, f"{a.n / s:.2f}", f"{s / a.n:.4f}", f"{base / s:.1f}x"]
            for (label, (steps, nfe)), s in zip(labels.items(), seconds.values())]
    print(markdown(["sampler", "steps", "NFE / image", "images / s", "s / image",
                    "speedup vs the teacher's default"], rows))
    return seconds


# ----------------------------------------------------------------------------------------------
# ladd: one LADD step (student update + heads update), in a subprocess per case


def ladd_case(spec):
    """Runs in its own process: builds a teacher, a student and heads of one config (random
    weights) and times train_ladd's student_step + heads_step; the process's peak
    memory is the step's. Teacher stored in the autocast dtype on CUDA, fp32 elsewhere; the
    student fp32 with AdamW, as train_ladd.py has them. The one place an entry script loads
    another: this case measures the training script's own step, in a child process."""
    import flow
    import train_ladd
    from discriminator import Discriminator
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = pick_device(spec["device"])
    amp = pick_dtype(spec["dtype"], device)
    cuda = device.type == "cuda"
    config = model_config(spec["config"], spec["depth"])
    h, w = latent_size(spec["config"], config, spec["size"])
    B, L = spec["batch"], spec["text_tokens"]
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = rss_peak_bytes()

    torch.manual_seed(0)
    teacher = random_mmdit(config, device, amp if cuda else torch.float32).requires_grad_(False)
    rank, targets = spec.get("lora", 0), spec.get("lora_targets", "attn")

    def new_student():  # fp32 weights of the teacher's shape, or a LoRA student on it
        if rank:
            return lora.add_adapters(teacher, rank, targets=targets)
        return random_mmdit(config, device, torch.float32)
    student = new_student()
    ema = new_student().requires_grad_(False) if spec.get("memory_report") else None
    disc = Discriminator.for_teacher(config).to(device)
    student.gradient_checkpointing = teacher.gradient_checkpointing = spec["checkpointing"]
    opt_g = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4,
                              betas=(0.9, 0.99), weight_decay=0.0)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=2e-4, betas=(0.0, 0.99), weight_decay=0.0)
    x0, _, context, pooled = mmdit_inputs(config, B, h, w, L, device, torch.float32)
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([1.0, 0.75, 0.5, 0.25]).repeat(B)[:B].to(device)      # [B] student times
    t_hat = flow.sample_t_logit_normal(B, 1.0, 1.0, g, device)              # [B] re-noising
    noise = {k: torch.randn(x0.shape, generator=g).to(device) for k in ("eps", "eps_fake", "eps_real")}
    batch = train_ladd.Batch(x0, context, pooled, t, t_hat, **noise)
    run = train_ladd.StepSettings(amp, grad_clip=1.0)

    def step():
        fake, stats = train_ladd.student_step(student, teacher, disc, opt_g, batch, run)
        stats.update(train_ladd.heads_step(teacher, disc, opt_d, batch, fake, run))
        if stats["student_skipped"] or stats["heads_skipped"]:
            raise RuntimeError(f"a step was skipped (non-finite loss or gradient): {stats}")
    seconds = time_cases({"step": step}, device, spec["warmup"], spec["iters"])["step"]
    if cuda:
        peak, base = torch.cuda.max_memory_allocated(device), torch.cuda.memory_allocated(device)
    else:
        peak, base = rss_peak_bytes(), start
    report = memory_report(teacher, student, ema, disc, opt_g, opt_d, device,
                           teacher_dtype=amp if cuda else torch.float32)[1] if ema else ""
    return {"seconds": seconds, "peak_bytes": peak, "base_bytes": base, "device": str(device),
            "dtype": str(amp).removeprefix("torch."), "params": mmdit.count_params(teacher),
            "trained": sum(p.numel() for p in student.parameters() if p.requires_grad),
            "heads": len(disc.blocks), "head_params": mmdit.count_params(disc), "report": report}


def run_ladd_case(spec):
    code = ("import json, sys, bench; "
            "print('RESULT ' + json.dumps(bench.ladd_case(json.loads(sys.argv[1]))))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], cwd=HERE,
                         capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"the LADD step case (checkpointing {spec['checkpointing']}) failed:\n"
                           f"{out.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def ladd_spec(a, checkpointing, config):
    text_tokens = a.text_tokens or settings(a.config, config)[1]
    return {"config": a.config, "depth": a.depth, "size": list(a.size), "batch": a.batch,
            "text_tokens": text_tokens, "checkpointing": checkpointing, "device": a.device,
            "dtype": a.dtype, "warmup": a.warmup, "iters": a.iters, "threads": a.threads,
            "lora": a.lora, "lora_targets": a.lora_targets, "memory_report": a.memory_report}


def bench_ladd(a):
    device = pick_device(a.device)  # the cases pick it again; errors here are one line
    pick_dtype(a.dtype, device)
    config = model_config(a.config, a.depth)
    a.size = a.size or settings(a.config, config)[2]
    h, w = latent_size(a.config, config, a.size)
    cuda = device.type == "cuda"
    a.warmup, a.iters = defaults_for(a, (2, 5) if cuda else (1, 3))
    modes = {"both": [False, True], "on": [True], "off": [False]}[a.checkpointing]
    try:
        results = [(on, run_ladd_case(ladd_spec(a, on, config))) for on in modes]
    except RuntimeError as e:
        raise SystemExit(f"error: {e}") from None
    r = results[0][1]
    student = (f"a LoRA student of rank {a.lora} on {a.lora_targets} ({r['trained'] / 1e6:.3f} M "
               f"trained, sharing the teacher's weights)" if a.lora else "a full student")
    print(f"one LADD step (train_ladd.student_step + heads_step): teacher "
          f"{a.config} (depth {config.depth}, {r['params'] / 1e6:.1f} M params), {student}, "
          f"{r['heads']} heads ({r['head_params'] / 1e6:.2f} M), {a.size[0]}x{a.size[1]} px = "
          f"{h}x{w} latent, batch {a.batch}, {r['device']} autocast {r['dtype']}"
          f"{f', {a.threads} thread' + 's' * (a.threads > 1) if a.threads and not cuda else ''}"
          f"; median of {a.iters} "
          f"steps after {a.warmup}"
          + ("" if a.memory_report else "; not included: the student's EMA (4 bytes a trained "
             "parameter; --memory-report builds it)")
          + ("; peak = max_memory_allocated, held = allocated between steps (weights, "
             "gradients, AdamW states)" if cuda else
             "; peak = the case process's peak RSS, above imports = its growth after importing torch"))
    header = ["checkpointing", "batch", "s / step", "samples / s"]
    header += ["peak allocated (MiB)", "held between steps (MiB)"] if cuda else \
        ["peak RSS (MiB)", "peak RSS above imports (MiB)"]
    rows = [["on" if on else "off", a.batch, f"{r['seconds']:.3f}", f"{a.batch / r['seconds']:.1f}",
             mib(r["peak_bytes"]), mib(r["base_bytes"] if cuda else r["peak_bytes"] - r["base_bytes"])]
            for on, r in results]
    print(markdown(header, rows))
    for on, r in results:
        if r["report"]:
            print(f"checkpointing {'on' if on else 'off'}: " + r["report"])
    return results


# ----------------------------------------------------------------------------------------------
# vae: tiled vs untiled decode, a subprocess per case


CASE = r"""
import json, resource, sys, time
import torch
import vae as vae_lib
from cli import pick_device, pick_dtype
args = json.loads(sys.argv[1])
device = pick_device(args["device"])
dtype = pick_dtype(args["dtype"], device)
torch.manual_seed(0)
model = vae_lib.VAE(args["config"]).to(device, dtype).eval()
f = model.config.factor
z = torch.randn(1, model.config.z_channels, args["size"] // f, args["size"] // f, device=device)
def peak():
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
if device.type == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
base = torch.cuda.memory_allocated() if device.type == "cuda" else peak()
t0 = time.time()
with torch.no_grad():
    img = model.decode(z, tile=args["tile"] or None)
if device.type == "cuda":
    torch.cuda.synchronize()
print(json.dumps({"seconds": time.time() - t0, "peak_bytes": peak() - base,
                  "shape": list(img.shape), "device": str(device), "dtype": str(dtype)}))
"""


def run_case(args, tile):
    spec = json.dumps({"config": args.config, "size": args.size, "tile": tile,
                       "device": args.device, "dtype": args.dtype})
    out = subprocess.run([sys.executable, "-c", CASE, spec], capture_output=True, text=True,
                         cwd=HERE)
    if out.returncode:
        raise SystemExit(f"error: the benchmark case (tile={tile}) failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_vae(args):
    rows = [("untiled", run_case(args, 0)), (f"tiled {args.tile}", run_case(args, args.tile))]
    dev = rows[0][1]["device"] + " " + rows[0][1]["dtype"]
    a, b = rows[0][1], rows[1][1]
    print(f"VAE decode, config {args.config}, {args.size}x{args.size} px, {dev}; tiled / untiled: "
          f"memory {b['peak_bytes'] / max(a['peak_bytes'], 1):.2f}x, "
          f"time {b['seconds'] / a['seconds']:.2f}x")
    print("| mode | peak memory (MiB) | seconds |\n|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['peak_bytes'] / 2**20:.0f} | {r['seconds']:.2f} |")


# ----------------------------------------------------------------------------------------------
# gpu-check: the one script a session with a lent GPU runs


SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")


def sdpa_backends(fn, device):
    """Which scaled-dot-product-attention implementation fn() runs, from the aten ops the profiler
    records (aten::_scaled_dot_product_flash_attention, ..._efficient_attention,
    ..._cudnn_attention, ..._attention_math; on the CPU ..._flash_attention_for_cpu).
    -> ({backend: calls}, number of GPU kernels with 'flash' in their name)."""
    from torch.profiler import ProfilerActivity, profile
    if device.type == "cpu":
        os.environ.setdefault("KINETO_LOG_LEVEL", "99")  # no profiler_start/stop lines on stderr
    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * (device.type == "cuda")
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    calls, kernels = {}, 0
    for event in prof.key_averages():
        if event.key.startswith("aten::_scaled_dot_product_"):
            backend = next((b for b in SDPA_BACKENDS if b in event.key), None)
            if backend:
                calls[backend] = calls.get(backend, 0) + event.count
        elif "flash" in event.key.lower() and not event.key.startswith("aten::"):
            kernels += event.count
    return calls, kernels


def flash_check(model, forward, x_dtype, tokens, device):
    """(ok, text): FlashAttention is enabled, runs alone (sdpa_kernel(FLASH_ATTENTION)) on
    q, k, v of the model's attention shapes, and is what every attention of a forward uses."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    c = model.config
    q, k, v = (torch.randn(1, tokens, c.num_heads, c.head_dim, device=device, dtype=x_dtype)
               for _ in range(3))                                          # [1, S, H, hd] each
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            mmdit.attention(q, k, v)                                        # [1, S, D]
            sync(device)
        forced = "runs"
    except RuntimeError as e:
        forced = f"refused ({one_line(e)[:120]})"
    with torch.no_grad():
        calls, kernels = sdpa_backends(forward, device)
    want = c.depth + len(c.dual_attention_layers)
    ok = (torch.backends.cuda.flash_sdp_enabled() and forced == "runs"
          and calls == {"flash": want})
    used = ", ".join(f"{b} x{n}" for b, n in calls.items()) or "no SDPA op seen"
    gpu = f", {kernels} flash kernels" if device.type == "cuda" else ""
    return ok, (f"{'used' if ok else 'NOT USED'}: flash_sdp_enabled "
                f"{torch.backends.cuda.flash_sdp_enabled()}; sdpa_kernel(FLASH_ATTENTION) on "
                f"{str(x_dtype).removeprefix('torch.')} [1, {c.num_heads}, {tokens}, {c.head_dim}] "
                f"{forced}; one forward: {used} (want flash x{want}){gpu}")


def time_train_ladd(dry_run, timeout, out=None):
    """(ok, text): wall time of the shapes world's default `python train_ladd.py`, data
    generation included (a fresh data folder), and its judged student."""
    with tempfile.TemporaryDirectory() as tmp:
        out = out or os.path.join(tmp, "ladd")
        cmd = [sys.executable, "train_ladd.py", "--out", out, "--data-dir", os.path.join(tmp, "data")]
        if dry_run:
            # the test preset's 8 latents make buckets of 2 at the shipped teacher's 3 sizes
            cmd += ["--preset", "test", "--batch-size", "2", "--device", "cpu", "--judge-n", "0"]
        t0 = time.perf_counter()
        try:
            run = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return False, f"not finished after {timeout} s (stopped)"
        seconds = time.perf_counter() - t0
    if run.returncode:
        last = (run.stderr.strip().splitlines() or ["no output"])[-1]
        return False, f"FAILED (exit {run.returncode}): {last[:200]}"
    score = ""
    for line in run.stdout.splitlines():  # train_ladd.py prints "student, 4 steps, judged: {...}"
        if line.startswith("student, 4 steps, judged:"):
            try:
                score = f"; student (4 steps) all correct {json.loads(line.split(':', 1)[1])['all_correct']}"
            except (ValueError, KeyError):
                score = f"; {line[:120]}"
    return True, f"{seconds / 60:.1f} min ({seconds:.0f} s, data generation included){score}"


def gpu_check(a):
    """Each check reports ok / FAIL and a one-line result; a failing check (an error, out of
    memory) does not stop the others, so one run on a lent GPU says as much as it can."""
    dry = a.dry_run
    if not dry and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        raise ValueError(f"gpu-check needs a CUDA GPU and torch {torch.__version__} ({build}) sees "
                         "none; run it on a machine with an NVIDIA GPU (or pass --dry-run)")
    t_start = time.perf_counter()
    if dry:
        torch.set_num_threads(1)  # tiny models: threads only wait for each other
    device, dtype = torch.device("cpu" if dry else "cuda"), torch.bfloat16
    cuda = device.type == "cuda"
    name, size, ladd_size, n = ("test", (16, 16), (16, 16), 256) if dry else \
        ("sd3-medium", (1024, 1024), (512, 512), 8192)
    config, text_tokens = mmdit.CONFIGS[name], settings(name, mmdit.CONFIGS[name])[1]
    h, w = latent_size(name, config, size)
    N = (h // config.patch_size) * (w // config.patch_size)
    rows, state = [], {"peak": None}

    def check(label, fn):
        try:
            ok, text = fn()
        except Exception as e:  # noqa: BLE001 -- reported in the table, the other checks go on
            ok, text = False, f"FAILED: {type(e).__name__}: {one_line(e)[:300]}"
        rows.append((label, "ok" if ok else "FAIL", text))
        print(f"{label}: {text}", flush=True)

    def peak():
        state["peak"] = matmul_peak(device, dtype, n=n)
        return True, f"{state['peak'] / 1e12:.3g} TFLOP/s (measured, {n}^3)"

    def model():
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        state["model"] = random_mmdit(config, device, dtype).eval()
        x, t, context, pooled = mmdit_inputs(config, 1, h, w, text_tokens, device, dtype)
        state["forward"] = lambda: state["model"](x, t, context, pooled)
        return flash_check(state["model"], state["forward"], dtype, N + text_tokens, device)

    def forward():
        with torch.no_grad():
            s = time_cases({"f": state["forward"]}, device, *((1, 2) if dry else (3, 10)))["f"]
        achieved = mmdit_flops(config, N, text_tokens) / s
        share = f" ({100 * achieved / state['peak']:.0f} % of the matmul peak)" if state["peak"] else ""
        mem = f", peak {torch.cuda.max_memory_allocated(device) / 2 ** 30:.1f} GiB" if cuda else ""
        return True, f"{1000 * s:.1f} ms, {achieved / 1e12:.3g} TFLOP/s{share}{mem}"

    def ladd():
        r = run_ladd_case({"config": name, "depth": None, "size": list(ladd_size), "batch": 2,
                           "text_tokens": text_tokens, "checkpointing": True, "device": str(device),
                           "dtype": "auto" if dry else "bf16", "warmup": 1, "iters": 2 if dry else 3,
                           "threads": 1 if dry else 0})
        held = f", held between steps {r['base_bytes'] / 2 ** 30:.1f} GiB" if cuda else ""
        return True, (f"{r['seconds']:.2f} s / step, peak {r['peak_bytes'] / 2 ** 30:.1f} GiB{held} "
                      "(EMA copy not included)")

    print(f"gpu-check on {describe(device, dtype)}, torch {torch.__version__}", flush=True)
    check("bf16 matmul peak", peak)
    check("flash attention", model)
    if "forward" in state:
        check(f"{name} forward {size[0]}x{size[1]} bf16 batch 1", forward)
    state.clear()  # free the model before the LADD case's process needs the memory
    if cuda:
        torch.cuda.empty_cache()
    check(f"LADD step {name} {ladd_size[0]}x{ladd_size[1]} batch 2 checkpointing on", ladd)
    if a.skip_train:
        check("python train_ladd.py", lambda: (True, "skipped (--skip-train)"))
    else:
        print(f"running python train_ladd.py (at most {a.train_timeout} s) ...", flush=True)
        check("python train_ladd.py", lambda: time_train_ladd(dry, a.train_timeout, a.train_out))

    print(f"gpu-check took {time.perf_counter() - t_start:.0f} s")
    print(markdown(["check", "status", "result"], rows))
    if any(ok != "ok" for _, ok, _ in rows):
        raise SystemExit(1)
    return rows


# ----------------------------------------------------------------------------------------------
# command line


def build_parser():
    """bench.py's parser: one subcommand per benchmark."""
    p = Parser(prog="bench.py", description=__doc__.split("\n\n")[0].strip(), allow_abbrev=False)
    sub = p.add_subparsers(dest="what", required=True, metavar="{mmdit,sample,ladd,vae,gpu-check}")

    def common(q, size=True):
        q.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
        q.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                       help="auto: bf16 on CUDA, fp32 elsewhere")
        q.add_argument("--threads", type=non_negative, default=0,
                       help="CPU threads (0: torch's default)")
        if size:
            q.add_argument("--config", default="shapes", choices=list(mmdit.CONFIGS),
                           help="mmdit.CONFIGS name")
            q.add_argument("--depth", type=positive, default=None, help="blocks (default: the config's)")
            q.add_argument("--size", type=parse_size, default=None,
                           help="WIDTHxHEIGHT image pixels (default: the config's usual size)")
            q.add_argument("--batch", type=positive, default=None, help="samples per step")
            q.add_argument("--text-tokens", type=positive, default=None,
                           help="text tokens per sample (default: SD3's 154, shapes' 14)")
            q.add_argument("--warmup", type=non_negative, default=None,
                           help="untimed iterations first (default: 1 on the CPU, more on CUDA)")
            q.add_argument("--iters", type=positive, default=None,
                           help="timed iterations, the median reported (default: 3 on the CPU, "
                                "more on CUDA)")

    m = sub.add_parser("mmdit", help="MMDiT forward (+ backward) throughput", allow_abbrev=False)
    common(m)
    m.add_argument("--backward", action="store_true", help="also time forward+backward")
    m.add_argument("--compile", action="store_true",
                   help="also time the model with torch.compile'd blocks (MMDiT.compile_blocks)")
    s = sub.add_parser("sample", help="end-to-end sampling speed: default vs 4 and 1 steps",
                       allow_abbrev=False)
    common(s, size=False)
    s.add_argument("--ckpt", default="assets/shapes_teacher.safetensors", help="the teacher")
    s.add_argument("--student", default=None, help="a student file or run folder (default: "
                   "the teacher at 4 and 1 unguided steps, the same speed)")
    s.add_argument("--n", type=positive, default=16, help="images per timed run, one batch")
    s.add_argument("--size", type=parse_size, default=None, help="WIDTHxHEIGHT (default: the ckpt's)")
    s.add_argument("--repeats", type=positive, default=3, help="timed runs, the median reported")
    ladd = sub.add_parser("ladd", help="one LADD step: time and peak memory", allow_abbrev=False)
    common(ladd)
    ladd.add_argument("--checkpointing", default="both", choices=("on", "off", "both"),
                      help="gradient checkpointing of teacher and student")
    ladd.add_argument("--lora", type=non_negative, default=0,
                      help="a LoRA student of this rank on the teacher's own weights (0: a full one)")
    ladd.add_argument("--lora-targets", default="attn", help="attn, mlp, mod (comma-separated)")
    ladd.add_argument("--memory-report", action="store_true",
                      help="also build the student's EMA and print training.memory_report's rows")
    v = sub.add_parser("vae", help="tiled vs untiled VAE decode", allow_abbrev=False)
    v.add_argument("--config", default="shapes", choices=list(vae_lib.CONFIGS), help="vae.CONFIGS name")
    v.add_argument("--size", type=positive, default=1024, help="image side in pixels")
    v.add_argument("--tile", type=positive, default=64, help="tile side in latent pixels")
    v.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    v.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="auto: bf16 on CUDA, fp32 elsewhere")
    g = sub.add_parser("gpu-check", help="the checks for a session with a GPU (< 8 min on an H100)",
                       allow_abbrev=False)
    g.add_argument("--skip-train", action="store_true", help="do not run python train_ladd.py")
    g.add_argument("--train-timeout", type=positive, default=300, help="seconds for train_ladd.py")
    g.add_argument("--train-out", default=None, help="keep train_ladd.py's run folder here "
                   "(default: a temporary folder)")
    g.add_argument("--dry-run", action="store_true", help="every check on the CPU with the tiny "
                   "test config (tests this script without a GPU)")
    return p


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--gpu-check"]:
        argv[0] = "gpu-check"
    args = build_parser().parse_args(argv)
    if getattr(args, "batch", 0) is None:
        args.batch = {"mmdit": 1, "ladd": 32}[args.what]
    return args


def run(args):
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    return {"mmdit": bench_mmdit, "sample": bench_sample, "ladd": bench_ladd, "vae": bench_vae,
            "gpu-check": gpu_check}[args.what](args)


def main(argv=None):
    return run_cli(parse_args, run, argv)


if __name__ == "__main__":
    main()

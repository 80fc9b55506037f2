"""
LADD's training data: latents the teacher generated itself (guided, at its default steps), with
their prompts' conditioning, one aspect-ratio bucket per size; or, for ablations, rendered
shapes-world images through the VAE ("real" data). --task inpaint and --task edit add their
teachers' extra input channels ("extra": the mask and known latent, or the source's latent).
Generated once, cached as fp16 safetensors shards in a folder named by the hash of every setting
that changes them, and reused by every run with the same settings (an interrupted generation
continues at the first missing shard).
The teacher (and a --cond file) are named by the sha256 of their tensors, so two checkpoints
with the same layout but other weights never share samples. Training reads the shards memory-
mapped, in fp16: a batch's rows are converted to fp32 when drawn, nothing is held in RAM.
"""

import hashlib
import json
import os

import numpy as np
import torch
from tqdm import tqdm

import cli
import editing
import inpainting
import pipeline
import shapes
import training
import weights


def prompt_source(cfg, pipe):
    """-> (describe: str for the cache key, conditioning(indices) -> (Conditioning, captions)).
    --task edit: caption i is the instruction of edit_task(cfg, i, ...) (ladd_run.check_config
    refuses --prompts and --cond with it)."""
    if cfg.task == "edit":
        w, h = pipe.sizes[0]  # an edit's instruction does not depend on the size

        def take_edits(index):
            captions = [edit_task(cfg, i, w, h).instruction.text for i in index]
            return pipeline.encode(pipe, captions), captions
        return "edit-tasks", take_edits
    if cfg.cond and cfg.prompts:
        raise ValueError("--cond replaces --prompts; pass one or the other")
    if cfg.cond:
        cond = pipeline.load_cond(cfg.cond)
        want = (pipe.model.config.context_dim, pipe.model.config.pooled_dim)
        if (cond.context.shape[-1], cond.pooled.shape[-1]) != want:
            raise ValueError(f"--cond {cfg.cond}: (context, pooled) widths "
                             f"{(cond.context.shape[-1], cond.pooled.shape[-1])} but the teacher "
                             f"takes {want}: it was made with other text encoders than the "
                             f"teacher's; make it with python text_encoders.py --ckpt <the "
                             f"teacher's SD3 file or folder> --prompts ... --out cond/")

        def take(index):
            rows = [i % len(cond) for i in index]
            return pipeline.Conditioning(cond.context[rows], cond.pooled[rows], cond.uncond_context,
                                         cond.uncond_pooled), [f"cond {r}" for r in rows]
        return f"cond:{content_id(cfg.cond, cfg.data_dir)}", take
    if cfg.prompts:
        if not cfg.prompts.endswith(".txt"):
            raise ValueError(f"--prompts {cfg.prompts}: want a .txt file, one prompt a line")
        lines = cli.read_prompts([cfg.prompts], "--prompts")
        if not lines:
            raise ValueError(f"--prompts {cfg.prompts}: no prompts in it (one a line)")
        if pipeline.is_shapes(pipe):
            for n, line in enumerate(lines, 1):
                try:
                    shapes.parse_caption(line)
                except ValueError as e:
                    raise ValueError(f"--prompts {cfg.prompts} line {n}: {e}") from None
        describe = "prompts:" + hashlib.sha1("\n".join(lines).encode()).hexdigest()[:12]

        def pick(index):  # the prompts in turn
            return [lines[i % len(lines)] for i in index]
    elif pipeline.is_shapes(pipe):
        describe = "shapes-random"

        def pick(index):  # caption i is a pure function of (seed, i)
            return [shapes.random_caption(np.random.default_rng([cfg.seed, i])) for i in index]
    else:
        raise ValueError(f"--teacher {cfg.teacher} is not a shapes-world model: pass --prompts "
                         "FILE (one prompt a line) or --cond FILE (precomputed conditioning)")

    def take(index):
        captions = pick(index)
        return pipeline.encode(pipe, captions), captions
    return describe, take


def content_id(path, data_dir):
    """Names the tensors of a safetensors file (or of every one in a folder) by their sha256,
    computed once per file and remembered in data_dir/file_hashes.json by path, size and
    modification time."""
    files = ([os.path.join(d, f) for d, _, names in sorted(os.walk(path)) for f in sorted(names)
              if f.endswith(".safetensors")] if os.path.isdir(path) else [path])
    memo_path = os.path.join(data_dir, "file_hashes.json")
    memo = json.load(open(memo_path)) if os.path.isfile(memo_path) else {}
    digests = []
    for file in files:
        stat, key = os.stat(file), os.path.abspath(file)
        if memo.get(key, [None, None])[:2] != [stat.st_size, stat.st_mtime_ns]:
            print(f"hashing {file}'s tensors (once: remembered in {memo_path})")
            memo[key] = [stat.st_size, stat.st_mtime_ns, weights.tensors_sha256(file)]
            weights.atomic_write(memo_path, lambda f: f.write(json.dumps(memo, indent=1).encode()))
        digests.append(memo[key][2])
    return hashlib.sha256(json.dumps(digests).encode()).hexdigest()[:16]


def data_settings(cfg, pipe, describe, sizes):
    """Everything the dataset depends on; its hash names the cache folder."""
    d = pipe.defaults
    settings = {"kind": cfg.data, "teacher": content_id(pipe.path, cfg.data_dir),
                "text_encoder": pipeline.text_encoder_spec(pipe), "prompts": describe,
                "steps": cfg.data_steps or d["steps"], "cfg": cfg.data_cfg or d["cfg"],
                "shift": d.get("shift"), "sampler": d["sampler"],
                "sizes": [list(s) for s in sizes], "size": cfg.data_size, "seed": cfg.seed}
    if cfg.task == "edit":  # the teacher's image guidance of its edits
        settings["image_cfg"] = editing.edit_settings(pipe)["image_cfg"]
    if cfg.data == "real" or cfg.task in ("inpaint", "edit"):  # the VAE encodes the data
        vae = hashlib.sha256(str(pipe.vae.config).encode())  # its scale and shift too
        for name, t in sorted(pipe.vae.state_dict().items()):
            vae.update(name.encode() + weights.raw_bytes(t).tobytes())
        settings["vae"] = vae.hexdigest()[:16]
    return settings if cfg.task == "t2i" else {**settings, "task": cfg.task}


SHARD = 64  # latents per cache file
# datasets that ship with the project, read before --data-dir: the default run's (seed 0), made
# by `python train_ladd.py --data-dir assets/data --steps 0 --judge-n 0 --out runs/data_only`
# when assets/data holds no folder of its settings
SHIPPED_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "data")
NOISE_SEED = 10_000_000  # synthetic latent i starts from the noise of seed NOISE_SEED + i


def build_dataset(cfg, pipe, describe, take, sizes, world=training.World()):
    """-> {(width, height): {"latents": [[n, C, h, w] of each shard], "context": [[n, L, Dc] ...],
    "pooled": [[n, Dp] ...], ...}}: fp16 views of the memory-mapped cache files (sample_batch reads
    rows of them). Generates (and caching, one atomic shard at a time) whatever is missing. With several
    processes each generates its share of the missing shards; then every rank reads them all."""
    settings = data_settings(cfg, pipe, describe, sizes)
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    per_size = bucket_size(cfg.data_size, sizes)
    names = [(f"{w}x{h}_{start // SHARD:04d}.safetensors", (w, h),
              list(range(k * per_size + start, k * per_size + min(start + SHARD, per_size))))
             for k, (w, h) in enumerate(sizes) for start in range(0, per_size, SHARD)]
    folder = os.path.join(SHIPPED_DATA, key)  # the default run's data come with the project
    if not all(os.path.isfile(os.path.join(folder, name)) for name, _, _ in names):
        folder = os.path.join(cfg.data_dir, key)
        os.makedirs(folder, exist_ok=True)
        if world.main:
            weights.atomic_write(os.path.join(folder, "settings.json"),
                                 lambda f: f.write(json.dumps(settings, indent=1).encode()))
    shards = [(os.path.join(folder, name), size, index) for name, size, index in names]
    missing = [s for s in shards if not os.path.isfile(s[0])]
    for path, (w, h), index in tqdm(missing[world.rank::world.size], desc=f"{cfg.data} data",
                                    unit="shard", dynamic_ncols=True, disable=not world.main):
        _write_shard(cfg, pipe, take, index, w, h, path, settings)
    world.barrier()
    dataset = {}
    for path, size, index in shards:
        shard = weights.load_file(path)  # views of the file: read from disk when used
        if cfg.data == "synthetic":  # each latent's starting noise
            shard["seed"] = NOISE_SEED + torch.tensor(index)                      # [n]
        for key, part in shard.items():
            dataset.setdefault(size, {}).setdefault(key, []).append(part)
    made = sum(len(index) for _, _, index in missing)
    print(f"data: {per_size * len(sizes)} {cfg.data} latents in {folder} "
          f"({made} generated now, {per_size * len(sizes) - made} from the cache)")
    return dataset


def bucket_size(data_size, sizes):
    """Latents in each size bucket of a dataset of `data_size` split evenly over `sizes`."""
    return max(1, data_size // len(sizes))


def edit_task(cfg, index, width, height):
    """--task edit: the data's edit `index` (its source, instruction and target)."""
    return editing.task_of(cfg.seed, index, width, height)


def encode_images(pipe, images):
    """Images [n, 3, H, W] in [-1, 1] -> their VAE latents [n, C, h, w] (fp32, CPU)."""
    with torch.no_grad():
        return pipe.vae.encode(images.to(pipe.device, pipe.dtype)).float().cpu()


def edit_shard(cfg, pipe, cond, index, w, h, settings):
    """--task edit: -> (x0 latents [n, C, h, w]: the teacher's own guided edits of the rendered
    sources, or with --data real the rendered targets through the VAE; the sources' latents
    [n, C, h, w], the extra input channels an editing model reads)."""
    pairs = [edit_task(cfg, i, w, h).render() for i in index]
    sources = encode_images(pipe, torch.stack([p[0] for p in pairs]))          # [n, C, h, w]
    if cfg.data == "real":
        return encode_images(pipe, torch.stack([p[1] for p in pairs])), sources  # [n, C, h, w]
    latents = editing.edit_latents(pipe, sources, cond, [NOISE_SEED + i for i in index],
                                   settings["steps"], settings["cfg"], settings["image_cfg"])
    return latents, sources                                                    # [n, C, h, w]


def _write_shard(cfg, pipe, take, index, w, h, path, settings):
    cond, captions = take(index)
    tensors = {}
    if cfg.task == "edit":  # rendered sources; x0: the teacher's edit of each (or the target)
        latents, sources = edit_shard(cfg, pipe, cond, index, w, h, settings)  # [n, C, h, w] each
        tensors["extra"] = sources.half()                                      # [n, C, h, w]
    elif cfg.task == "inpaint":  # world renders, a random mask each; x0: the teacher's completion
        images = shapes.render_batch(captions, w, h, seed=index[0])            # [n, 3, H, W]
        rng = np.random.default_rng([cfg.seed, index[0], 2])
        masks = torch.stack([inpainting.random_mask(im, rng) for im in images])   # [n, 1, H, W]
        with torch.no_grad():
            z0 = pipe.vae.encode(images.to(pipe.device, pipe.dtype)).float().cpu()  # [n, C, h, w]
        m = inpainting.latent_mask(masks, pipe.vae.config.factor)                 # [n, 1, h, w]
        latents = z0 if cfg.data == "real" else inpainting.inpaint_latents(
            pipe, z0, m, cond, [NOISE_SEED + i for i in index], settings["steps"], settings["cfg"])
        tensors["extra"] = inpainting.known_channels(z0, m).half()                # [n, 1 + C, h, w]
    elif cfg.data == "synthetic":  # the teacher's own guided samples, from seeds no student sees
        latents = pipeline.generate(pipe, cond, w, h, steps=settings["steps"], cfg=settings["cfg"],
                           seed=NOISE_SEED + index[0], batch_size=len(index), progress=False,
                           decode=False)                                       # [n, C, h, w]
    else:  # real: rendered images of the captions, through the VAE
        if not pipeline.is_shapes(pipe):
            raise ValueError("--data real exists for the shapes world only (it renders captions)")
        images = shapes.render_batch(captions, w, h, seed=index[0])            # [n, 3, H, W]
        with torch.no_grad():
            latents = pipe.vae.encode(images.to(pipe.device, pipe.dtype)).float().cpu()
    weights.save_file({"latents": latents.half(), "context": cond.context.half(),
                       "pooled": cond.pooled.half(), **tensors}, path,
                      {"captions": json.dumps(captions), "settings": json.dumps(settings)})


def sample_batch(dataset, batch_size, generator):
    """One aspect-ratio bucket, then distinct random rows of it, read from its shards (every
    shard holds SHARD rows but the last) -> {name: [B, ...]}: latents, context and pooled
    converted to fp32 on the CPU (and an inpainting or editing task's extra channels, or a
    synthetic latent's noise seed)."""
    sizes = sorted(dataset)
    bucket = dataset[sizes[int(torch.randint(len(sizes), (1,), generator=generator))]]
    rows = torch.randperm(sum(len(p) for p in bucket["latents"]), generator=generator)[:batch_size]
    picked = {key: torch.stack([parts[r // SHARD][r % SHARD] for r in rows.tolist()])
              for key, parts in bucket.items()}
    return {key: x.float() if x.is_floating_point() else x for key, x in picked.items()}

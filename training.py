"""
The harness both training scripts share, kept out of the way of the methods: several processes
(`World`), a random generator per step, mixed precision, the guarded update, the EMA, an AdamW
with bf16 moments, checkpoint metadata, and memory accounting.
"""

import atexit
import contextlib
import datetime
import json
import os
import signal
import sys
import threading
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

import cli
import flow
import lora
import mmdit
import weights

SHIPPED = {"t2i": "shapes_teacher.safetensors",             # assets/: the shapes world's teachers
           "inpaint": "shapes_inpaint_teacher.safetensors",
           "edit": "shapes_edit_teacher.safetensors"}


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


def check_writable(cfg, *options):
    """The folders these options name can be written (cli.check_out_folder), checked by one
    process: under torchrun the others would race on the folders it makes and removes again."""
    if os.environ.get("RANK", "0") == "0":
        for name in options:
            if getattr(cfg, name):
                cli.check_out_folder(getattr(cfg, name), "--" + name.replace("_", "-"))


def init_world(device_name, batch_size):
    """-> (World, device). torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; without them this is
    one process on `device_name`. Several processes use cuda:LOCAL_RANK with NCCL, or the CPU
    with gloo; ranks other than 0 print nothing. The global batch must split evenly."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    device = cli.pick_device(device_name)
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
# one training step's pieces


def step_generator(seed, step, device="cpu"):
    """Every random draw of training step `step` comes from this generator, seeded by
    (seed, step): a resumed run draws exactly what an uninterrupted one would."""
    return torch.Generator(device).manual_seed(flow.derive_seed(seed, step) % 2 ** 63)  # any --seed


def autocast(device, amp):
    """Mixed precision in `amp` on `device` (a torch.device or its type); fp32 means none."""
    device_type = device if isinstance(device, str) else device.type
    return torch.autocast(device_type, dtype=amp, enabled=amp != torch.float32)


def update(opt, loss, params, grad_clip, world=World()):
    """backward, clip, step; a step whose loss or gradient is not finite is skipped (and counted),
    so no NaN ever reaches the weights. -> (grad norm, 1 if skipped else 0). With several
    processes the loss must be finite on every rank (all skip together); the gradient, averaged
    by DDP, is the same on every rank."""
    opt.zero_grad(set_to_none=True)
    if not world.all_true(torch.isfinite(loss)):
        return float("nan"), 1
    loss.backward()
    norm = clip_grad_norm(params, grad_clip)
    if not torch.isfinite(norm):
        opt.zero_grad(set_to_none=True)
        return norm.item(), 1
    opt.step()
    return norm.item(), 0


def clip_grad_norm(params, max_norm):
    """Scale the gradients of `params` down to norm `max_norm` when above it -> their norm before
    clipping (a tensor; not finite when any gradient is NaN or inf). The same on every rank."""
    norm = torch.nn.utils.clip_grad_norm_(list(params), max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay ema + (1 - decay) model, for each trained parameter (a LoRA student's
    frozen base is shared, not averaged)."""
    for e, p in zip(ema.parameters(), model.parameters()):
        if p.requires_grad:
            e.lerp_(p.detach(), 1 - decay)


# ----------------------------------------------------------------------------------------------
# optimizers


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
                        self.state[p][key] = self.state[p][key].to(cli.DTYPES[group["state_dtype"]])

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
                    dtype = cli.DTYPES[group["state_dtype"]]
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


# ----------------------------------------------------------------------------------------------
# files


def checkpoint_metadata(script, cfg, text_encoder, vae, sampler, sizes, **extra):
    """A trained MMDiT's safetensors metadata: what pipeline.load_pipeline reads (its text
    encoder, VAE file, sampling defaults, sizes) and how it was made (command, full config).
    extra: more string entries (e.g. train_steps, judge)."""
    return {"text_encoder": json.dumps(text_encoder), "vae": vae, "sampler": json.dumps(sampler),
            "sizes": json.dumps([list(s) for s in sizes]),
            "command": f"python {script} " + " ".join(sys.argv[1:]),
            "train_config": json.dumps(asdict(cfg)), **extra}


# ----------------------------------------------------------------------------------------------
# run folders: nothing of a run is lost or mixed with another's


RUN_OUTPUTS = ("config.json", "log.jsonl", "state.safetensors", "model.safetensors",
               "student.safetensors", "adapters.safetensors", "vae.safetensors")


def start_run(cfg):
    """Before a run writes into cfg.out: remove the .tmp-* files of a save killed midway; with
    --overwrite, remove what an earlier run wrote there (weights, state, log, pictures; other
    files stay); then save the run's config.json.
    (cli.resolve_config has already refused a folder holding a run without --overwrite.)"""
    os.makedirs(cfg.out, exist_ok=True)
    remove_stale_temporaries(cfg.out)
    if cfg.overwrite:
        for name in os.listdir(cfg.out):
            if name in RUN_OUTPUTS or name.endswith(".png") and name.startswith(("grid", "samples")):
                os.remove(os.path.join(cfg.out, name))
    weights.atomic_write(os.path.join(cfg.out, "config.json"),
                         lambda f: f.write(json.dumps(asdict(cfg), indent=1).encode()))


def remove_stale_temporaries(folder):
    """Remove the hidden .tmp-* files that a save killed midway (SIGKILL, power loss) left in a
    run folder (weights.atomic_write makes them beside its target); nothing else is touched."""
    stale = [os.path.join(folder, n) for n in os.listdir(folder) if n.startswith(".tmp-")]
    stale = [p for p in stale if os.path.isfile(p) and not os.path.islink(p)]
    if stale:
        size = sum(os.path.getsize(p) for p in stale)
        for path in stale:
            os.remove(path)
        print(f"removed {len(stale)} unfinished .tmp-* file(s) of an interrupted save from "
              f"{folder} ({size / 2 ** 20:.1f} MB)")


def open_log(path, keep=lambda record: True):
    """log.jsonl, to append to. A resumed run first drops the records that `keep` rejects (the
    steps logged after its last saved state), so the log holds every step once."""
    if os.path.isfile(path):
        with open(path) as f:
            lines = [line for line in f if line.strip() and keep(json.loads(line))]
        weights.atomic_write(path, lambda f: f.write("".join(lines).encode()))
    return open(path, "a")


STOP_SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}  # schedulers, `timeout`


@contextlib.contextmanager
def finish_step_on_interrupt():
    """Within: the first Ctrl-C (or SIGTERM) only sets `.requested`, so the training loop
    finishes its step and saves an exact, resumable state; a second one stops at once
    (KeyboardInterrupt)."""
    flag = type("Interrupt", (), {"requested": False})()

    def handle(signum, frame):
        if flag.requested:
            raise KeyboardInterrupt
        flag.requested = True
        name = STOP_SIGNALS[signum]
        print(f"\n{name}: finishing this step, then saving ({name} again to stop at once)",
              file=sys.stderr)
    if threading.current_thread() is not threading.main_thread():  # signals reach the main one
        yield flag
        return
    previous = {s: signal.signal(s, handle) for s in STOP_SIGNALS}
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def interrupted(script, out, step):
    """What a run stopped by Ctrl-C raises once its state is saved (cli.run_cli: exit 130)."""
    return KeyboardInterrupt(f"stopped at step {step} with its state saved in {out}; continue "
                             f"with: python {script} --resume {out}")


# ----------------------------------------------------------------------------------------------
# memory


def tensor_bytes(tensors, seen=None):
    """Bytes of the storages these tensors live in (an FSDP tensor: its local shard's), each
    storage counted once, by its address; pass one `seen` set to several calls to count a storage
    only in the first. A view of a bigger storage counts all of it, so a tensor in another dtype,
    storage shared between components or over-allocated shows against a planned size."""
    seen = set() if seen is None else seen
    total = 0
    for t in tensors:
        if t is None:
            continue
        storage = (t.to_local() if hasattr(t, "to_local") else t).untyped_storage()
        key = (storage.device, storage.data_ptr())
        if storage.nbytes() and key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def rss_peak_bytes():
    """This process's peak resident memory."""
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def memory_report(teacher, student, ema, disc, opt_g, opt_d, device, shards=1, teacher_dtype=None):
    """(rows, text): each component's bytes planned next to the bytes its tensors hold after a step.

    estimated: the plan, from element counts only: each module's weights (parameters, and buffers
    such as pos_embed) and the student's gradients and moments, times the bytes the dtype plan
    gives them: the teacher in `teacher_dtype` (None: the dtype it was loaded in, its first
    parameter's); the student, its gradients and the EMA in fp32; AdamW's two moments in opt_g's
    state dtype (fp32 for torch's AdamW); the heads 16 bytes a parameter (fp32 weights,
    gradients, two moments). measured: the storages the tensors live in, each counted once
    (tensor_bytes), so a tensor in an unplanned dtype, storage shared by two components or a
    view of a bigger buffer shows as a difference. Then the measured peak: on CUDA the
    allocator's since the last reset (weights + activations and temporaries), elsewhere the
    process's peak resident memory (also data, libraries, the interpreter).
    shards: the student's and EMA's parameters are split over this many FSDP processes (their
    buffers are not); the rows are per rank."""
    def n_buffers(module):
        return sum(b.numel() for b in module.buffers())

    def tensors(module):  # what a module's weights row holds
        return [*module.parameters(), *module.buffers()]

    n_t = mmdit.count_params(teacher) + n_buffers(teacher)
    n_s = sum(p.numel() for p in student.parameters() if p.requires_grad) // shards  # trained
    # the student's weights: all trained, or for a LoRA student only its adapters (the rest are
    # the teacher's own tensors, counted in the teacher's row)
    n_w = n_s + (0 if lora.is_lora(student) else n_buffers(student))
    n_d, n_db = mmdit.count_params(disc), n_buffers(disc)
    moments = [v for opt in (opt_g,) for state in opt.state.values() for v in state.values()
               if torch.is_tensor(v) and v.dim()]
    heads = [*tensors(disc), *(p.grad for p in disc.parameters()),
             *(v for state in opt_d.state.values() for v in state.values()
               if torch.is_tensor(v) and v.dim())]
    tb = (teacher_dtype or next(teacher.parameters()).dtype).itemsize
    mb = cli.DTYPES[opt_g.defaults.get("state_dtype", "fp32")].itemsize
    seen = set()  # a storage counts once, in the first row that holds it

    def held(ts):
        return tensor_bytes(ts, seen)
    weights_row = "student LoRA adapters (fp32)" if lora.is_lora(student) else \
        "student weights (fp32 master)"
    rows = [("teacher weights (frozen)", tb * n_t, held(tensors(teacher))),
            (weights_row, 4 * n_w, held(tensors(student))),
            ("student gradients", 4 * n_s, held(p.grad for p in student.parameters())),
            ("student AdamW moments", 2 * mb * n_s, held(moments)),
            ("student EMA" + " (of the adapters)" * lora.is_lora(student), 4 * n_w,
             held(tensors(ema))),
            ("heads: weights, gradients, AdamW", 16 * n_d + 4 * n_db, held(heads))]
    rows.append(("held in all", sum(r[1] for r in rows), sum(r[2] for r in rows)))
    if device.type == "cuda":
        rows.append(("peak allocated (+ activations)", None, torch.cuda.max_memory_allocated(device)))
    else:
        rows.append(("process peak RSS (+ activations, data)", None, rss_peak_bytes()))
    gib = lambda n: "-" if n is None else f"{n / 2 ** 30:.3f}"  # noqa: E731
    lines = [f"memory on {device} after one step (GiB): estimated | measured"]
    lines += [f"  {name:<40} {gib(est):>9} | {gib(real):>9}" for name, est, real in rows]
    return rows, "\n".join(lines)

"""torchrun with 2 processes (gloo, CPU) against one process with the same global batch: both
ranks end with the same weights, and they match the single-process run."""
import os
import subprocess
import sys

import pytest
import torch

import train_ladd
import train_teacher
import training
import weights
from conftest import make_checkpoint

ONE_THREAD = True
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs a training script's main() in every process, then saves that rank's EMA weights.
DRIVER = """
import sys
import torch.distributed as dist
sys.path.insert(0, {repo!r})
import {script}, weights
result = {script}.main(sys.argv[1:])
model = getattr(result, "model", result)
state = {{k: v.full_tensor() if hasattr(v, "full_tensor") else v  # FSDP: gather the shards
         for k, v in model.state_dict().items()}}
folder = sys.argv[sys.argv.index("--out" if "--out" in sys.argv else "--resume") + 1]
weights.save_file(state, folder + f"/ema_rank{{dist.get_rank()}}.safetensors")
"""


def torchrun(tmp_path, script, args):
    driver = tmp_path / f"{script}_driver.py"
    driver.write_text(DRIVER.format(repo=REPO, script=script))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", str(driver), *args],
                         capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


def assert_same_run(single, ranks, start):
    """Every rank bit-identical; the run equal to one process up to float summation order (the
    gradient is summed in another order), far below how far training moved the weights."""
    for other in ranks[1:]:
        assert all(torch.equal(ranks[0][k], other[k]) for k in ranks[0])
    moved = max((single[k] - start[k]).abs().max().item() for k in start)
    apart = max((single[k] - ranks[0][k]).abs().max().item() for k in start)
    assert moved > 1e-3, moved
    assert apart < 1e-3 * moved, (apart, moved)


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "lora"])
def test_ladd_two_processes_match_one(tmp_path, mode):
    """DDP: 3 steps. FSDP (--shard): 2 steps, then --resume to 3, which also checks that the
    gathered state saves and loads back into shards. LoRA: DDP over a rank-2 LoRA student."""
    teacher = make_checkpoint(str(tmp_path), {"steps": 2, "cfg": 2.0, "shift": 1.0,
                                              "sampler": "euler"})
    args = ["--preset", "test", "--teacher", teacher, "--data-dir", str(tmp_path / "data"),
            "--device", "cpu", "--judge-n", "2", "--data-size", "16", "--batch-size", "4",
            "--lr", "2e-3", "--ema", "0", "--pair-weight", "0"] + ["--lora", "2"] * (mode == "lora")
    # without the pairs: with them the GAN's 3 steps amplify float summation order past the
    # tolerance; their gradient over split rows is test_train_ladd's (exact to float precision)
    single = train_ladd.main([*args, "--steps", "3", "--out", str(tmp_path / "one")]
                             ).model.state_dict()
    two = str(tmp_path / "two")
    if mode in ("ddp", "lora"):
        out = torchrun(tmp_path, "train_ladd", [*args, "--steps", "3", "--out", two,
                                                "--memory-report"])
        assert "x 2 process(es)" in out
    else:
        out = torchrun(tmp_path, "train_ladd", [*args, "--steps", "2", "--out", two, "--shard",
                                                "--memory-report"])
        assert "x 2 process(es) (FSDP)" in out
        out = torchrun(tmp_path, "train_ladd", ["--resume", two, "--steps", "3"])
        assert "resumed" in out
    assert "16 from the cache" in out
    for steps in ("4 steps", "2 steps", "1 step"):  # rank 0 alone prints
        assert out.count(f"student, {steps}, judged:") == 1
    ranks = [weights.load_file(tmp_path / "two" / f"ema_rank{r}.safetensors") for r in (0, 1)]
    start = weights.load_file(teacher)
    if mode == "lora":  # the adapters as they started: a run of 0 steps
        start = train_ladd.main([*args, "--steps", "0", "--out", str(tmp_path / "zero")]
                                ).model.state_dict()
    assert_same_run(single, ranks, {k: start[k].float() for k in single})
    assert (tmp_path / "two" / "grid.png").is_file()
    # rank 0 wrote the run (and only rank 0 wrote anything but its own weights)
    saved = weights.load_file(tmp_path / "two" / ("adapters.safetensors" if mode == "lora" else
                                                  "model.safetensors"))
    assert all(torch.equal(saved[k], ranks[0][k]) for k in saved)


def test_teacher_two_processes_match_one(tmp_path):
    args = ["--preset", "test", "--device", "cpu", "--judge-n", "0", "--batch-size", "4",
            "--steps", "3", "--lr", "1e-2", "--ema", "0", "--warmup", "1"]
    one = tmp_path / "one"
    single = train_teacher.main([*args, "--out", str(one)]).state_dict()
    # same VAE for both (phase 1 runs in one process anyway; this keeps its time out of the test)
    torchrun(tmp_path, "train_teacher", [*args, "--out", str(tmp_path / "two"),
                                         "--vae", str(one / "vae.safetensors")])
    ranks = [weights.load_file(tmp_path / "two" / f"ema_rank{r}.safetensors") for r in (0, 1)]
    start = train_teacher.main([*args, "--steps", "0", "--out", str(tmp_path / "zero"),
                                "--vae", str(one / "vae.safetensors")]).state_dict()
    assert_same_run(single, ranks, start)


def test_a_batch_that_does_not_split_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="--batch-size 4 does not split over 3"):
        training.init_world("cpu", 4)  # before any process group is made
    world = training.World(rank=1, size=3)
    assert world.rows(torch.arange(6)).tolist() == [2, 3]
    assert world.rows(list("abcdef")) == ["c", "d"]
    with pytest.raises(ValueError, match="multiple of 3"):
        world.rows(torch.arange(4))

"""Nothing lost, nothing silently wrong: run folders, --resume and --overwrite, option checks
before any work, Ctrl-C, the data cache's key, memory-mapped data, streamed checkpoints."""
import gc
import json
import os
import shutil
import signal
import weakref

import pytest
import torch

import discriminator
import ladd_data
import ladd_run
import train_ladd
import train_teacher
import weights
from conftest import LADD_SAMPLER, expect_one_line_error, files, ladd_argv, make_checkpoint

ONE_THREAD = True
TEACHER_FAST = ["--preset", "test", "--judge-n", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_checkpoint(str(tmp_path_factory.mktemp("teacher")), LADD_SAMPLER)


ladd = ladd_argv


def log_steps(folder):
    return [r["step"] for r in map(json.loads, open(folder / "log.jsonl")) if "judge" not in r]


def same_weights(a, b):
    a, b = weights.load_file(a), weights.load_file(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def expect_unchanged(main, capsys, argv, folder, *words):
    """A one-line error, and not a byte of `folder` changed (or it still does not exist)."""
    before = files(folder)
    err = expect_one_line_error(main, capsys, argv, *words)
    assert files(folder) == before
    return err


@pytest.fixture(scope="module")
def finished(teacher, tmp_path_factory):
    """A finished 4-step LADD run."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train_ladd.main(ladd(teacher, out))
    return out


# ----------------------------------------------------------------------------------------------
# run folders


def test_a_finished_run_is_never_overwritten_without_overwrite(teacher, finished, capsys):
    expect_unchanged(train_ladd.main, capsys, ladd(teacher, finished), finished,
                     "holds a run", "--resume", "--overwrite")


def test_overwrite_starts_again_and_leaves_nothing_of_the_old_run(teacher, finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "grid_000999.png").write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    train_ladd.main(ladd(teacher, out, "--overwrite", "--steps", "2"))
    assert log_steps(out) == [0, 1]  # the new run's steps only, nothing appended to the old
    assert not (out / "grid_000999.png").exists() and (out / "notes.txt").read_text() == "mine"
    assert weights.load_state(out / "state.safetensors")["step"] == 2


def test_resume_without_a_state_is_an_error_naming_it(teacher, finished, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    os.remove(out / "state.safetensors")
    expect_unchanged(train_ladd.main, capsys, ["--resume", str(out)], out,
                     "state.safetensors", "--overwrite")
    expect_unchanged(train_ladd.main, capsys, ["--resume", str(tmp_path / "none")],
                     tmp_path / "none", "config.json")


def test_resume_refuses_options_that_define_the_run(finished, capsys):
    err = expect_unchanged(train_ladd.main, capsys,
                           ["--resume", str(finished), "--seed", "1", "--data-size", "16"],
                           finished, "--seed 1", "--data-size 16", "--steps")
    assert "the run's: 0" in err and "the run's: 8" in err
    expect_unchanged(train_ladd.main, capsys, ["--resume", str(finished), "--overwrite"],
                     finished, "--overwrite")


def test_resume_continues_the_log_without_repeating_steps(teacher, tmp_path, monkeypatch):
    """A crash after step 2 leaves the log at step 2 and the state at step 2 (saved every 2
    steps): the resumed run re-runs step 2 and logs it once."""
    whole, part = tmp_path / "whole", tmp_path / "part"
    train_ladd.main(ladd(teacher, whole))
    real = train_ladd.student_step

    def crash_at_3(*args):
        crash_at_3.calls += 1
        if crash_at_3.calls == 4:  # step 3
            raise RuntimeError("crash")
        return real(*args)
    crash_at_3.calls = 0
    monkeypatch.setattr(train_ladd, "student_step", crash_at_3)
    with pytest.raises(RuntimeError):
        train_ladd.main(ladd(teacher, part))
    assert log_steps(part) == [0, 1, 2]
    assert weights.load_state(part / "state.safetensors")["step"] == 2
    monkeypatch.undo()
    train_ladd.main(["--resume", str(part)])
    assert log_steps(part) == log_steps(whole) == [0, 1, 2, 3]
    assert same_weights(whole / "model.safetensors", part / "model.safetensors")


# ----------------------------------------------------------------------------------------------
# every option checked before any work


@pytest.mark.parametrize("extra, words", [
    (["--times", "1,1,1", "--time-probs", "1,1,1", "--warmup-probs", "1,1,1"], ["--times", "decreasing"]),
    (["--times", "1,1,1"], ["--times 1,1,1", "decreasing"]),
    (["--times", "1,0.5,0"], ["--times"]),
    (["--time-probs", "0,0,0,0"], ["--time-probs", "sum to 0"]),
    (["--time-probs", "nan,1,1,1"], ["--time-probs", "finite"]),
    (["--time-probs", "1,1"], ["--time-probs", "4 finite weights"]),
    (["--t-hat-std", "-1"], ["--t-hat-std -1", "> 0"]),
    (["--lr", "nan"], ["--lr nan", "finite"]),
    (["--batch-size", "0"], ["--batch-size 0", ">= 1"]),
    (["--data-size", "0"], ["--data-size 0"]),
    (["--ema", "1.5"], ["--ema 1.5", "[0, 1)"]),
    (["--data-cfg", "inf"], ["--data-cfg inf"]),
    (["--disc-blocks", "7"], ["7"]),
])
def test_bad_ladd_options_fail_before_any_work(teacher, tmp_path, capsys, extra, words):
    """Neither the run folder nor the data cache is touched: the check comes before both."""
    out, data = tmp_path / "run", tmp_path / "data"
    argv = ladd(teacher, out, *extra)
    argv[argv.index("--data-dir") + 1] = str(data)
    expect_unchanged(train_ladd.main, capsys, argv, out, *words)
    assert not data.exists()


def test_a_prompts_file_must_be_utf8_text(teacher, tmp_path, capsys):
    binary = tmp_path / "prompts.txt"
    binary.write_bytes(bytes(range(256)))
    expect_unchanged(train_ladd.main, capsys, ladd(teacher, tmp_path / "run", "--prompts", str(binary)),
                     tmp_path / "run", f"--prompts {binary}", "UTF-8")
    expect_unchanged(train_ladd.main, capsys, ladd(teacher, tmp_path / "run", "--prompts", "p.csv"),
                     tmp_path / "run", "--prompts p.csv", ".txt")


def test_bad_options_leave_an_existing_run_as_it_was(teacher, finished, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    expect_unchanged(train_ladd.main, capsys, ladd(teacher, out, "--overwrite", "--lr", "-1"),
                     out, "--lr")


@pytest.mark.parametrize("extra, words", [
    (["--model-config", "nope"], ["--model-config 'nope'", "shapes"]),
    (["--batch-size", "0"], ["--batch-size 0", ">= 1"]),
    (["--vae-config", "nope"], ["--vae-config"]),
    (["--caption-dropout", "2"], ["--caption-dropout 2"]),
    (["--sample-cfg", "nan"], ["--sample-cfg nan"]),
    (["--vae", "missing.safetensors"], ["--vae missing.safetensors"]),
    (["--init", "missing.safetensors"], ["--init missing.safetensors"]),
])
def test_bad_teacher_options_fail_before_the_vae_phase(tmp_path, capsys, extra, words):
    out = tmp_path / "run"
    expect_unchanged(train_teacher.main, capsys, TEACHER_FAST + ["--out", str(out), *extra], out,
                     *words)


def test_teacher_run_folders_resume_and_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    train_teacher.main(TEACHER_FAST + ["--out", str(out), "--steps", "2"])
    capsys.readouterr()
    expect_unchanged(train_teacher.main, capsys, TEACHER_FAST + ["--out", str(out)], out,
                     "holds a run", "--resume")
    expect_unchanged(train_teacher.main, capsys, ["--resume", str(out), "--lr", "0.1"], out,
                     "--lr 0.1")
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    os.remove(broken / "vae.safetensors")
    expect_unchanged(train_teacher.main, capsys, ["--resume", str(broken)], broken,
                     "vae.safetensors")
    train_teacher.main(["--resume", str(out), "--steps", "3"])
    steps = [r["step"] for r in map(json.loads, open(out / "log.jsonl")) if r["phase"] == "teacher"]
    assert steps == [0, 1, 2]


# ----------------------------------------------------------------------------------------------
# Ctrl-C


def test_ctrl_c_saves_an_exact_state_and_says_how_to_continue(teacher, finished, tmp_path,
                                                              capsys, monkeypatch):
    out = tmp_path / "run"
    real = train_ladd.student_step

    def ctrl_c_in_step_1(*args):
        result = real(*args)  # the signal arrives in the middle of step 1
        if ctrl_c_in_step_1.calls == 1:
            os.kill(os.getpid(), signal.SIGINT)
        ctrl_c_in_step_1.calls += 1
        return result
    ctrl_c_in_step_1.calls = 0
    monkeypatch.setattr(train_ladd, "student_step", ctrl_c_in_step_1)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as e:
        train_ladd.main(ladd(teacher, out))
    assert e.value.code == 130
    assert (f"\ninterrupted: stopped at step 2 with its state saved in {out}; continue with: "
            f"python train_ladd.py --resume {out}\n") in capsys.readouterr().err
    assert weights.load_state(out / "state.safetensors")["step"] == 2  # step 1 was finished
    assert signal.getsignal(signal.SIGINT) is handler  # the usual Ctrl-C again
    monkeypatch.undo()
    train_ladd.main(["--resume", str(out)])
    assert log_steps(out) == [0, 1, 2, 3]
    assert same_weights(finished / "model.safetensors", out / "model.safetensors")


def test_ctrl_c_in_the_data_phase_leaves_a_resumable_run(teacher, finished, tmp_path, capsys,
                                                         monkeypatch):
    out = tmp_path / "run"

    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(ladd_data, "build_dataset", interrupted)
    with pytest.raises(SystemExit) as e:
        train_ladd.main(ladd(teacher, out))
    assert e.value.code == 130 and "--resume" in capsys.readouterr().err
    assert weights.load_state(out / "state.safetensors")["step"] == 0
    monkeypatch.undo()
    train_ladd.main(["--resume", str(out)])
    assert same_weights(finished / "model.safetensors", out / "model.safetensors")


def test_ctrl_c_stops_the_teacher_at_a_resumable_step(tmp_path, capsys, monkeypatch):
    whole, out = tmp_path / "whole", tmp_path / "run"
    train_teacher.main(TEACHER_FAST + ["--out", str(whole), "--steps", "3"])
    real = train_teacher.flow_loss

    def ctrl_c_at_step_1(*args, **kwargs):
        ctrl_c_at_step_1.calls += 1
        if ctrl_c_at_step_1.calls == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)
    ctrl_c_at_step_1.calls = 0
    monkeypatch.setattr(train_teacher, "flow_loss", ctrl_c_at_step_1)
    with pytest.raises(SystemExit) as e:
        train_teacher.main(TEACHER_FAST + ["--out", str(out), "--steps", "3"])
    assert e.value.code == 130 and "--resume" in capsys.readouterr().err
    assert weights.load_state(out / "state.safetensors")["step"] == 2
    monkeypatch.undo()
    train_teacher.main(["--resume", str(out)])
    assert same_weights(whole / "model.safetensors", out / "model.safetensors")


# ----------------------------------------------------------------------------------------------
# the EMA


@pytest.mark.parametrize("warmup, decay", [(1, 0.5), (10, 2 / 11)])
def test_ema_decay_is_ema_or_its_documented_warmup(teacher, tmp_path, warmup, decay):
    """The decay at step s is min(--ema, (1 + s) / (--ema-warmup + s)). Step 0 leaves the
    student where it started (the heads start at logit 0: no gradient), so after step 1
    EMA = decay(1) * start + (1 - decay(1)) * student."""
    out = tmp_path / "run"
    train_ladd.main(ladd(teacher, out, "--steps", "2", "--ema", "0.5", "--ema-warmup", str(warmup)))
    start, student = weights.load_file(teacher), weights.load_file(out / "student.safetensors")
    ema = weights.load_file(out / "model.safetensors")
    moved = [k for k in ema if not torch.equal(start[k], student[k])]
    assert moved
    for k in moved:
        torch.testing.assert_close(ema[k], decay * start[k] + (1 - decay) * student[k])


# ----------------------------------------------------------------------------------------------
# the data: keyed by the teacher's tensors, memory-mapped fp16


def test_the_data_cache_is_keyed_by_the_teachers_tensors(teacher, tmp_path, capsys, monkeypatch):
    """Two teachers with the same layout, size and metadata but one value changed get two
    datasets; the same tensors with other metadata share one. Each file is hashed once."""
    other = tmp_path / "other"
    shutil.copytree(os.path.dirname(teacher), other, ignore=shutil.ignore_patterns("data"))
    infos, _, start = weights._read_header(other / "model.safetensors")
    first = min(infos.values(), key=lambda i: i.begin)
    with open(other / "model.safetensors", "r+b") as f:  # flip one byte of the first tensor
        f.seek(start + first.begin)
        byte = f.read(1)
        f.seek(start + first.begin)
        f.write(bytes([byte[0] ^ 1]))
    assert os.path.getsize(other / "model.safetensors") == os.path.getsize(teacher)
    assert weights.load_metadata(other / "model.safetensors") == weights.load_metadata(teacher)
    data = tmp_path / "data"
    hashed = []
    real = weights.tensors_sha256
    monkeypatch.setattr(weights, "tensors_sha256", lambda p: hashed.append(p) or real(p))
    for i, t in enumerate((teacher, str(other / "model.safetensors"), teacher)):
        argv = ladd(t, tmp_path / f"run{i}", "--steps", "0")
        argv[argv.index("--data-dir") + 1] = str(data)
        train_ladd.main(argv)
    assert len([p for p in data.iterdir() if p.is_dir()]) == 2
    assert len(hashed) == 2  # the third run used the remembered hash
    resaved = tmp_path / "resaved.safetensors"
    weights.save_file(weights.load_file(teacher), resaved,
                      {**weights.load_metadata(teacher), "command": "another note"})
    assert ladd_data.content_id(resaved, data) == ladd_data.content_id(teacher, data)


def test_the_dataset_is_memory_mapped_fp16_read_as_fp32_rows(teacher, tmp_path):
    out = tmp_path / "run"
    train_ladd.main(ladd(teacher, out, "--steps", "0", "--data-size", "140"))  # 70 per size
    cfg = train_ladd.Config(**json.load(open(out / "config.json")))
    pipe = ladd_run.load_teacher(cfg, torch.device("cpu"), torch.float32)
    describe, take = ladd_data.prompt_source(cfg, pipe)
    dataset = ladd_data.build_dataset(cfg, pipe, describe, take, pipe.sizes)
    for bucket in dataset.values():
        assert [len(p) for p in bucket["latents"]] == [64, 6]  # two shards: SHARD rows, then the rest
        for key in ("latents", "context", "pooled"):
            for part in bucket[key]:
                assert part.dtype == torch.float16
                # a view of the whole mapped file, not a copy of its rows in RAM
                assert part.untyped_storage().nbytes() > part.numel() * part.element_size()
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    rows = ladd_data.sample_batch(dataset, 8, g1)
    # the same draws from the whole bucket held in fp32: the same rows, the same values
    sizes = sorted(dataset)
    k = int(torch.randint(len(sizes), (1,), generator=g2))
    whole = {key: torch.cat(parts) for key, parts in dataset[sizes[k]].items()}
    index = torch.randperm(len(whole["latents"]), generator=g2)[:8]
    for key in ("latents", "context", "pooled"):
        assert rows[key].dtype == torch.float32 and torch.equal(rows[key], whole[key][index].float())
    # each synthetic latent's noise seed: latent i of the k-th size is sample k * 70 + i
    assert torch.equal(rows["seed"], ladd_data.NOISE_SEED + 70 * pipe.sizes.index(sizes[k]) + index)


# ----------------------------------------------------------------------------------------------
# files and devices


def test_save_file_holds_one_tensors_bytes_at_a_time(tmp_path, monkeypatch):
    """Checkpoints are written tensor by tensor: when one tensor's bytes are prepared, the
    previous tensor's are gone (on a GPU each is a CPU copy; never the whole state at once)."""
    alive, real = [], weights.raw_bytes

    def tracked(t):
        gc.collect()
        assert all(ref() is None for ref in alive), "an earlier tensor's bytes are still held"
        array = real(t)
        alive.append(weakref.ref(array))
        return array
    monkeypatch.setattr(weights, "raw_bytes", tracked)
    tensors = {f"w{i}": torch.randn(4, 5).t() for i in range(4)}  # transposed: copied to write
    weights.save_file(tensors, tmp_path / "x.safetensors")
    assert len(alive) == 4
    loaded = weights.load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_approx_r1_draws_its_noise_on_the_generators_device(monkeypatch):
    """CUDA refuses a CPU generator for a CUDA tensor; emulated here with features on the meta
    device and a randn that enforces the same rule."""
    real = torch.randn

    def strict_randn(*shape, generator=None, device=None, **kwargs):
        if generator is not None and torch.device(device or "cpu") != generator.device:
            raise RuntimeError(f"a {generator.device} generator cannot draw on {device}")
        return real(*shape, generator=generator, device=device, **kwargs)
    disc = discriminator.Discriminator(16, 8, [0], 8)
    feats_cpu = [torch.randn(2, 16, 3, 3)]
    t_hat, pooled = torch.rand(2), torch.randn(2, 8)
    monkeypatch.setattr(torch, "randn", strict_randn)
    g = torch.Generator().manual_seed(0)
    on_meta = discriminator.approx_r1(disc.to("meta"), [f.to("meta") for f in feats_cpu],
                                      t_hat.to("meta"), pooled.to("meta"), generator=g)
    assert on_meta.device.type == "meta"


def test_overwrite_removes_the_old_runs_grids_and_samples_pictures_only(tmp_path):
    """training.start_run with --overwrite removes the pictures a run writes (grid*.png,
    samples*.png) and its outputs, and keeps every other file."""
    import dataclasses
    import training

    @dataclasses.dataclass
    class Run:
        out: str
        overwrite: bool = True
    for name in ("grid_000200.png", "samples_x.png", "log.jsonl", "notes.png", "keep.txt"):
        (tmp_path / name).write_text("x")
    training.start_run(Run(str(tmp_path)))
    assert sorted(os.listdir(tmp_path)) == ["config.json", "keep.txt", "notes.png"]

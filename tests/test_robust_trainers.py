"""Nothing silently wrong in the trainers (issue #30, part 2): a batch bigger than the data's
size buckets, seeds out of range, folders that cannot be written, resuming the wrong run or
backwards, a corrupt config.json, leftovers of a killed save, SIGTERM, and --help."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import bench
import cli
import ladd_data
import train_ladd
import train_teacher
import weights
from conftest import LADD_SAMPLER, expect_one_line_error, files, ladd_argv, make_checkpoint, read_only

ONE_THREAD = True
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER_FAST = ["--preset", "test", "--judge-n", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """The tiny teacher: two sizes, so the test preset's 8 latents make buckets of 4."""
    return make_checkpoint(str(tmp_path_factory.mktemp("teacher")), LADD_SAMPLER)


@pytest.fixture(scope="module")
def ladd_run(teacher, tmp_path_factory):
    """A finished 4-step LADD run."""
    out = tmp_path_factory.mktemp("ladd") / "run"
    train_ladd.main(ladd_argv(teacher, out))
    return out


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A finished 4-step teacher run."""
    out = tmp_path_factory.mktemp("teacher_run") / "run"
    train_teacher.main(TEACHER_FAST + ["--out", str(out)])
    return out


def unchanged(main, capsys, argv, folders, *words):
    """A one-line error naming `words`, and not a byte of `folders` changed (or created)."""
    before = [files(f) for f in folders]
    err = expect_one_line_error(main, capsys, argv, *words)
    assert [files(f) for f in folders] == before
    return err


def same_tensors(a, b):
    a, b = weights.load_file(a), weights.load_file(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------
# a batch bigger than the data's size buckets


def test_a_batch_bigger_than_a_size_bucket_is_refused_before_any_work(teacher, tmp_path, capsys):
    out, data = tmp_path / "run", tmp_path / "data"
    argv = ladd_argv(teacher, out, "--batch-size", "5")
    argv[argv.index("--data-dir") + 1] = str(data)
    err = unchanged(train_ladd.main, capsys, argv, [out, data], "--batch-size 5",
                    "4 latents", "--data-size 8", "--data-size 10", "--batch-size 4")
    assert err == ("error: --batch-size 5: each size bucket holds 4 latents (--data-size 8 over "
                   "2 sizes) and a batch is drawn from one bucket; pass --batch-size 4 or less, "
                   "or --data-size 10 or more")
    sizes = ladd_argv(teacher, out, "--data-sizes", "16x16,32x16,16x24", "--data-size", "6",
                      "--batch-size", "3")
    unchanged(train_ladd.main, capsys, sizes, [out], "--batch-size 3", "2 latents",
              "over 3 sizes", "--data-size 9")


def test_a_run_saved_with_a_batch_bigger_than_its_buckets_says_how_to_start_again(ladd_run,
                                                                                 tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(ladd_run, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "batch_size": 6}))  # made before the check
    unchanged(train_ladd.main, capsys, ["--resume", str(out)], [out], "--batch-size 6",
              "4 latents", "trained on 4", "--overwrite --batch-size 4")


def test_the_bucket_size_is_the_datasets():
    """The check and the dataset count the rows of a bucket the same way."""
    assert ladd_data.bucket_size(576, [(64, 64), (96, 48), (48, 96)]) == 192
    assert ladd_data.bucket_size(8, [(64, 64), (96, 48), (48, 96)]) == 2
    assert ladd_data.bucket_size(2, [(64, 64), (96, 48), (48, 96)]) == 1


def test_a_batch_as_big_as_a_bucket_takes_every_row_once(teacher, tmp_path):
    out = tmp_path / "run"
    train_ladd.main(ladd_argv(teacher, out, "--steps", "1", "--batch-size", "4"))
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert log[0]["step"] == 0


def test_real_data_for_a_model_outside_the_shapes_world_is_refused_first(teacher, tmp_path,
                                                                         capsys):
    """--data real renders shapes-world captions: a teacher with another text encoder cannot
    have them, said before the run folder is written (it used to fail in the data phase)."""
    meta = weights.load_metadata(teacher)
    meta["text_encoder"] = json.dumps({"name": "sd3"})
    other = os.path.join(os.path.dirname(teacher), "sd3like.safetensors")  # beside its VAE
    weights.save_file(dict(weights.load_file(teacher)), other, meta)
    g = torch.Generator().manual_seed(0)
    cond = tmp_path / "cond.safetensors"
    weights.save_file({"context": torch.randn(3, 7, 64, generator=g),
                       "pooled": torch.randn(3, 64, generator=g),
                       "uncond_context": torch.zeros(1, 7, 64),
                       "uncond_pooled": torch.zeros(1, 64)}, cond)
    out = tmp_path / "run"
    unchanged(train_ladd.main, capsys, ladd_argv(other, out, "--cond", str(cond), "--data",
                                                 "real", "--pair-weight", "0"),
              [out], "--data real", "shapes world", "--data synthetic")


def test_a_teacher_judge_smaller_than_the_worlds_sizes_is_refused_first(tmp_path, capsys):
    """The VAE's judge splits --judge-n over the world's 3 sizes: 2 captions made none a size
    and a traceback after the VAE phase."""
    out = tmp_path / "run"
    unchanged(train_teacher.main, capsys, TEACHER_FAST + ["--out", str(out), "--judge-n", "2"],
              [out], "--judge-n 2", "pass 0", "3 or more")


# ----------------------------------------------------------------------------------------------
# seeds


@pytest.mark.parametrize("seed", ["-1", str(2 ** 63)])
def test_a_seed_out_of_range_names_the_option_and_writes_nothing(teacher, tmp_path, capsys, seed):
    out = tmp_path / "run"
    err = unchanged(train_ladd.main, capsys, ladd_argv(teacher, out, "--seed", seed), [out],
                    f"--seed {seed}", "2**63")
    assert err == f"error: --seed {seed}: want an integer in [0, 2**63)"
    unchanged(train_teacher.main, capsys, TEACHER_FAST + ["--out", str(out), "--seed", seed],
              [out], f"--seed {seed}", "[0, 2**63)")


def test_the_largest_seed_trains(teacher, tmp_path):
    seed = str(2 ** 63 - 1)
    train_ladd.main(ladd_argv(teacher, tmp_path / "ladd", "--seed", seed, "--steps", "1"))
    train_teacher.main(TEACHER_FAST + ["--out", str(tmp_path / "teacher"), "--seed", seed,
                                       "--steps", "1", "--vae-steps", "1"])
    assert weights.load_state(tmp_path / "teacher" / "state.safetensors")["step"] == 1


# ----------------------------------------------------------------------------------------------
# folders that cannot be written: refused before anything is written


def test_a_read_only_out_or_data_dir_is_refused_first(teacher, tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    read_only(locked, monkeypatch)
    out, data = tmp_path / "run", tmp_path / "data"
    argv = ladd_argv(teacher, locked / "run")
    argv[argv.index("--data-dir") + 1] = str(data)
    err = unchanged(train_ladd.main, capsys, argv, [locked, data], f"--out {locked / 'run'}",
                    "cannot write there")
    assert err.endswith("pass a writable folder")
    argv = ladd_argv(teacher, out)
    argv[argv.index("--data-dir") + 1] = str(locked / "data")
    unchanged(train_ladd.main, capsys, argv, [locked, out], f"--data-dir {locked / 'data'}",
              "cannot write there")
    for option in ("--out", "--export"):
        argv = TEACHER_FAST + ["--out", str(out), option, str(locked / "t")]
        unchanged(train_teacher.main, capsys, argv, [locked, out], f"{option} {locked / 't'}",
                  "cannot write there")


def test_an_export_folder_that_cannot_exist_is_refused_before_training(tmp_path, capsys):
    out = tmp_path / "run"
    unchanged(train_teacher.main, capsys, TEACHER_FAST + ["--out", str(out), "--export",
                                                           "/proc/nope"],
              [out], "--export /proc/nope", "cannot write there")


# ----------------------------------------------------------------------------------------------
# --resume: the right run, forwards, a readable config


def test_resuming_with_fewer_steps_than_done_is_refused(ladd_run, teacher_run, capsys):
    unchanged(train_ladd.main, capsys, ["--resume", str(ladd_run), "--steps", "2"], [ladd_run],
              "--steps 2", "already at step 4", "--steps 4")
    unchanged(train_teacher.main, capsys, ["--resume", str(teacher_run), "--steps", "3"],
              [teacher_run], "--steps 3", "already at step 4")


def test_resuming_another_trainers_run_names_that_trainer(ladd_run, teacher_run, capsys):
    err = unchanged(train_ladd.main, capsys, ["--resume", str(teacher_run)], [teacher_run],
                    f"--resume {teacher_run}", "train_teacher.py")
    assert f"python train_teacher.py --resume {teacher_run}" in err
    unchanged(train_teacher.main, capsys, ["--resume", str(ladd_run)], [ladd_run],
              f"--resume {ladd_run}", "made by train_ladd.py",
              f"python train_ladd.py --resume {ladd_run}")


@pytest.mark.parametrize("text", ['{"steps": 4,', "[1, 2]", ""])
def test_a_corrupt_config_json_is_named(ladd_run, tmp_path, capsys, text):
    out = tmp_path / "run"
    shutil.copytree(ladd_run, out)
    (out / "config.json").write_text(text)
    unchanged(train_ladd.main, capsys, ["--resume", str(out)], [out],
              str(out / "config.json"), "--overwrite")


# ----------------------------------------------------------------------------------------------
# a save killed midway leaves .tmp-* files: the next start in that folder removes them


def test_a_killed_saves_temporary_files_are_removed_on_resume(ladd_run, teacher_run, tmp_path):
    for name, run, main in (("ladd", ladd_run, train_ladd.main),
                            ("teacher", teacher_run, train_teacher.main)):
        out = tmp_path / name
        shutil.copytree(run, out)
        (out / ".tmp-k2j4x9").write_bytes(b"half a checkpoint")
        (out / "notes.tmp-1").write_text("mine")
        (out / "sub").mkdir()
        (out / "sub" / ".tmp-other").write_text("not the run's")
        main(["--resume", str(out)])
        assert not (out / ".tmp-k2j4x9").exists(), name
        assert (out / "notes.tmp-1").read_text() == "mine"
        assert (out / "sub" / ".tmp-other").exists()


def test_overwrite_removes_a_killed_saves_temporary_files(teacher, ladd_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(ladd_run, out)
    (out / ".tmp-abc").write_bytes(b"x")
    train_ladd.main(ladd_argv(teacher, out, "--overwrite", "--steps", "1"))
    assert not (out / ".tmp-abc").exists()


# ----------------------------------------------------------------------------------------------
# SIGTERM (schedulers, `timeout`) saves like Ctrl-C


def terminate_when_logged(argv, out, phase=None):
    """Start a training script, SIGTERM it once log.jsonl shows a step (of `phase`) -> the
    finished process (stderr read)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            log = out / "log.jsonl"
            records = [json.loads(line) for line in open(log)] if log.is_file() else []
            if any("step" in r and r.get("phase", phase) == phase for r in records):
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    proc.stderr_text = err
    return proc


def test_sigterm_saves_the_ladd_run_and_it_resumes_exactly(teacher, tmp_path):
    out, whole = tmp_path / "run", tmp_path / "whole"
    train_ladd.main(ladd_argv(teacher, tmp_path / "warm", "--steps", "0"))  # the data, cached
    proc = terminate_when_logged(["train_ladd.py", *ladd_argv(teacher, out, "--steps", "100000")],
                                 out)
    assert proc.returncode == 130, proc.stderr_text
    assert f"python train_ladd.py --resume {out}" in proc.stderr_text
    step = weights.load_state(out / "state.safetensors")["step"]
    assert 1 <= step < 100000
    train_ladd.main(["--resume", str(out), "--steps", str(step + 2)])
    train_ladd.main(ladd_argv(teacher, whole, "--steps", str(step + 2)))
    for name in ("model.safetensors", "student.safetensors"):
        assert same_tensors(whole / name, out / name), name


def test_sigterm_saves_the_teacher_run_and_it_resumes_exactly(tmp_path):
    out, whole = tmp_path / "run", tmp_path / "whole"
    argv = ["train_teacher.py", *TEACHER_FAST, "--out", str(out), "--steps", "100000"]
    proc = terminate_when_logged(argv, out, phase="teacher")
    assert proc.returncode == 130, proc.stderr_text
    assert f"python train_teacher.py --resume {out}" in proc.stderr_text
    step = weights.load_state(out / "state.safetensors")["step"]
    assert 1 <= step < 100000
    train_teacher.main(["--resume", str(out), "--steps", str(step + 2)])
    train_teacher.main(TEACHER_FAST + ["--out", str(whole), "--steps", str(step + 2)])
    assert same_tensors(whole / "model.safetensors", out / "model.safetensors")


def test_sigterm_in_the_data_phase_leaves_a_resumable_run(teacher, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"

    def terminated(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # the handler runs at once; this is never reached in full
        raise AssertionError("SIGTERM did not stop the data phase")

    def unhandled(signum, frame):  # what the run must replace (the default would end pytest)
        raise AssertionError("the run did not handle SIGTERM")
    previous = signal.signal(signal.SIGTERM, unhandled)
    monkeypatch.setattr(ladd_data, "build_dataset", terminated)
    try:
        with pytest.raises(SystemExit) as e:
            train_ladd.main(ladd_argv(teacher, out))
        assert signal.getsignal(signal.SIGTERM) is unhandled  # restored after the run
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert e.value.code == 130 and "--resume" in capsys.readouterr().err
    assert weights.load_state(out / "state.safetensors")["step"] == 0


# ----------------------------------------------------------------------------------------------
# --help: every option of every training and bench command says what it is


def described(parser):
    """parser -> {option: its help without the '(default: ...)' that cli adds}."""
    out = {}
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            text = (action.help or "").split(" (default:")[0].strip()
            out[action.option_strings[0]] = text
    return out


def bench_parsers():
    parser = bench.build_parser()
    sub = next(a for a in parser._actions if a.dest == "what")
    return sub.choices


@pytest.mark.parametrize("script", ["train_ladd.py", "train_teacher.py"])
def test_every_training_option_has_a_help(script):
    module = {"train_ladd.py": train_ladd, "train_teacher.py": train_teacher}[script]
    parser = cli.build_parser(module.Config, script, module.__doc__)
    helps = described(parser)
    assert len(helps) == len(module.Config.__dataclass_fields__)
    assert [o for o, text in helps.items() if not text] == []
    assert "--preset" in parser.format_help()  # what --help prints ('%' in a comment broke it)


def test_a_percent_sign_in_a_comment_is_printed_as_itself():
    import dataclasses

    @dataclasses.dataclass
    class Config:
        share: float = 0.5  # of the rows, in %
    assert "in %" in cli.build_parser(Config, "x", "doc").format_help()


def test_every_preset_is_in_the_preset_help():
    for module in (train_ladd, train_teacher):
        helps = described(cli.build_parser(module.Config, "x", module.__doc__))
        missing = [p for p in module.PRESETS if p not in helps["--preset"]]
        assert missing == [], module.__name__


@pytest.mark.parametrize("command", ["mmdit", "sample", "ladd", "vae", "gpu-check"])
def test_every_bench_option_has_a_help(command):
    helps = described(bench_parsers()[command])
    assert helps and [o for o, text in helps.items() if not text] == []
    assert "--device" in bench_parsers()[command].format_help() or command == "gpu-check"

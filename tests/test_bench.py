"""Tests for bench.py: every subcommand on the tiny test config prints its table last with the
expected columns; the FLOP count against a hand count and against torch's FLOP counter;
gpu-check without CUDA, and its dry run; one-line errors for bad arguments."""
import json
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import bench
import bench_diffusers
import mmdit
from conftest import expect_one_line_error, make_checkpoint

ONE_THREAD = True
TINY = ["--config", "test", "--size", "16x16", "--device", "cpu", "--warmup", "0", "--iters", "1"]


def last_table(out):
    """stdout -> (header, rows) of the markdown table, which must be the last thing printed."""
    lines = out.strip().splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("|---")) - 1
    assert all(line.startswith("|") for line in lines[start:]), out
    cells = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]  # noqa: E731
    return cells(lines[start]), [cells(line) for line in lines[start + 2:]]


def number(cell):
    return float(cell.replace(",", "").rstrip("x"))


# ----------------------------------------------------------------------------------------------
# the FLOP count


def test_flops_equal_a_hand_count():
    c = mmdit.MMDiTConfig(depth=2, hidden_size=8, num_heads=2, patch_size=1, in_channels=2,
                          out_channels=3, pos_embed_max_size=4, pooled_dim=5, context_dim=6,
                          mlp_ratio=2.0, dual_attention_layers=(0,))
    N, L, S = 4, 3, 7  # image tokens, text tokens, joint sequence
    embed = 2 * N * 2 * 8 + 2 * (256 * 8 + 8 * 8) + 2 * (5 * 8 + 8 * 8) + 2 * L * 6 * 8  # 4848
    mlp = lambda n: 2 * n * 8 * 16 * 2  # noqa: E731  fc1 + fc2
    block0 = (2 * 8 * 48 + 2 * L * 8 * 24 + 2 * L * 8 * 8 + mlp(L)          # text: adaLN 6D, qkv, proj, MLP
              + 2 * 8 * 72 + 2 * N * 8 * 24 + 2 * N * 8 * 8 + mlp(N)        # image: adaLN 9D (dual) ...
              + 2 * N * 8 * 24 + 2 * N * 8 * 8 + 4 * N * N * 8              # ... its second attention
              + 4 * S * S * 8)                                              # joint attention
    block1 = (2 * 8 * 16 + 2 * L * 8 * 24                                   # text, pre-only: adaLN 2D, qkv
              + 2 * 8 * 48 + 2 * N * 8 * 24 + 2 * N * 8 * 8 + mlp(N)
              + 4 * S * S * 8)
    final = 2 * 8 * 16 + 2 * N * 8 * 3
    assert (embed, block0, block1, final) == (4848, 13216, 7840, 448)
    assert bench.mmdit_flops(c, N, L) == embed + block0 + block1 + final == 26352


@pytest.mark.parametrize("name", ["test", "shapes"])
def test_flops_equal_torchs_flop_counter(name):
    """torch counts the matmuls it runs (attention through the math path, where it sees them)."""
    config = mmdit.CONFIGS[name]
    model = mmdit.MMDiT(config)
    x, t, context, pooled = bench.mmdit_inputs(config, 2, 8, 12, 5, "cpu", torch.float32)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t, context, pooled)
    assert counter.get_total_flops() == 2 * bench.mmdit_flops(config, 4 * 6, 5)


# ----------------------------------------------------------------------------------------------
# the subcommands


def test_mmdit_table(capsys):
    bench.main(["mmdit", *TINY, "--batch", "2", "--backward"])
    out = capsys.readouterr().out
    header, rows = last_table(out)
    assert header == ["model", "pass", "ms / iter", "image tokens / s", "TFLOP/s"]
    assert [r[:2] for r in rows] == [["ours", "forward"], ["ours", "forward+backward"]]
    assert all(number(c) > 0 for r in rows for c in r[2:])
    assert "4 image + 7 text tokens, batch 2" in out


def test_mmdit_compare_diffusers(capsys):
    pytest.importorskip("diffusers")
    bench_diffusers.main([*TINY, "--backward"])
    header, rows = last_table(capsys.readouterr().out)
    assert header[-1] == "ours / diffusers time"
    assert [r[:2] for r in rows] == [["ours", "forward"], ["diffusers", "forward"],
                                     ["ours", "forward+backward"], ["diffusers", "forward+backward"]]
    assert number(rows[0][-1]) > 0 and rows[1][-1] == ""


def test_diffusers_twin_computes_what_ours_does():
    pytest.importorskip("diffusers")
    config = mmdit.CONFIGS["test"]
    ours = bench.random_mmdit(config, torch.device("cpu"), torch.float32)
    ref = bench_diffusers.diffusers_twin(config, ours)
    x, t, context, pooled = bench.mmdit_inputs(config, 2, 4, 6, 5, "cpu", torch.float32)
    with torch.no_grad():
        want = ours(x, t, context, pooled)
        got = ref(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled,
                  timestep=1000 * t, return_dict=False)[0]
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)


def test_compare_diffusers_without_diffusers_is_one_line(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    expect_one_line_error(bench_diffusers.main, capsys, TINY,
                          "diffusers", "not importable")


def test_sample_table_teacher_alone_and_with_a_student(capsys, tmp_path):
    teacher = make_checkpoint(str(tmp_path), {"steps": 3, "cfg": 3.0, "shift": 1.0, "sampler": "euler"})
    student = make_checkpoint(str(tmp_path), {"times": [1.0, 0.5], "cfg": 1.0, "sampler": "euler"},
                              name="student.safetensors")
    columns = ["sampler", "steps", "NFE / image", "images / s", "s / image",
               "speedup vs the teacher's default"]
    bench.main(["sample", "--ckpt", teacher, "--device", "cpu", "--n", "2", "--repeats", "1"])
    out = capsys.readouterr().out
    header, rows = last_table(out)
    assert header == columns and "the student's speed" in out
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("teacher, 3 steps, CFG 3 (its default)", "3", "6"),
        ("teacher, 4 steps, unguided", "4", "4"), ("teacher, 1 step, unguided", "1", "1")]
    assert rows[0][-1] == "1.0x" and all(number(c) > 0 for r in rows for c in r[3:])

    bench.main(["sample", "--ckpt", teacher, "--student", student, "--device", "cpu", "--n", "2",
                "--repeats", "1", "--size", "24x16"])
    out = capsys.readouterr().out
    header, rows = last_table(out)
    assert header == columns and "24x16" in out
    assert [r[0] for r in rows[1:]] == ["student, 4 steps, unguided", "student, 1 step, unguided"]


def test_ladd_table_from_a_subprocess(capsys):
    bench.main(["ladd", *TINY, "--batch", "2", "--checkpointing", "off", "--threads", "1"])
    out = capsys.readouterr().out
    header, rows = last_table(out)
    assert header == ["checkpointing", "batch", "s / step", "samples / s", "peak RSS (MiB)",
                      "peak RSS above imports (MiB)"]
    assert len(rows) == 1 and rows[0][:2] == ["off", "2"]
    assert number(rows[0][2]) > 0 and number(rows[0][4]) >= number(rows[0][5]) >= 0
    assert "3 heads" in out


def test_ladd_case_with_checkpointing_runs_in_process():
    spec = {"config": "test", "depth": 2, "size": [24, 16], "batch": 3, "text_tokens": 5,
            "checkpointing": True, "device": "cpu", "dtype": "auto", "warmup": 0, "iters": 1,
            "threads": 1}
    r = bench.ladd_case(spec)
    assert r["seconds"] > 0 and r["peak_bytes"] > 0 and r["heads"] == 2 and not r["report"]
    assert r["params"] == r["trained"] == mmdit.count_params(mmdit.MMDiT(bench.model_config("test", 2)))
    r = bench.ladd_case({**spec, "lora": 2, "lora_targets": "attn", "memory_report": True})
    assert 0 < r["trained"] < r["params"] / 10 and "student LoRA adapters (fp32)" in r["report"]


# ----------------------------------------------------------------------------------------------
# gpu-check


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("argv", [["--gpu-check"], ["gpu-check", "--skip-train"]])
def test_gpu_check_without_cuda_exits_2_with_one_line(capsys, argv):
    expect_one_line_error(bench.main, capsys, argv, "CUDA")


def test_gpu_check_dry_run_reports_every_check(capsys, monkeypatch):
    # the LADD case in this process (a subprocess costs seconds of imports)
    monkeypatch.setattr(bench, "run_ladd_case", lambda spec: json.loads(json.dumps(bench.ladd_case(spec))))
    bench.main(["gpu-check", "--dry-run", "--skip-train"])
    header, rows = last_table(capsys.readouterr().out)
    assert header == ["check", "status", "result"]
    assert [r[0].split()[0] for r in rows] == ["bf16", "flash", "test", "LADD", "python"]
    assert all(r[1] == "ok" for r in rows), rows
    assert "flash x4 (want flash x4)" in rows[1][2]  # 3 joint attentions + 1 MMDiT-X


def test_sdpa_backends_sees_the_math_fallback():
    q = torch.randn(1, 5, 2, 8)  # [B, L, H, hd]
    with sdpa_kernel(SDPBackend.MATH):
        calls, kernels = bench.sdpa_backends(lambda: mmdit.attention(q, q, q), torch.device("cpu"))
    assert calls == {"math": 1} and kernels == 0


# ----------------------------------------------------------------------------------------------
# bad arguments: one line each


@pytest.mark.parametrize("argv, words", [
    (["mmdit", "--config", "nope"], ["--config", "nope"]),
    (["ladd", "--config", "sd3-large"], ["--config", "sd3-large"]),
    (["mmdit", "--size", "12by3"], ["--size", "12by3", "WIDTHxHEIGHT"]),
    (["mmdit", "--config", "test", "--size", "20x16", "--device", "cpu"], ["--size 20x16", "multiples of 8"]),
    (["ladd", "--config", "test", "--size", "128x128", "--device", "cpu"], ["--size 128x128", "to 64"]),
    (["mmdit", "--batch", "0"], ["--batch", "'0'"]),
    (["mmdit", "--dtype", "fp64"], ["--dtype"]),
    (["sample", "--ckpt", "no/such/file.safetensors", "--device", "cpu"], ["no/such/file"]),
    (["nope"], ["nope"]),
    ([], ["mmdit"]),
])
def test_bad_arguments_are_one_line_errors(capsys, argv, words):
    expect_one_line_error(bench.main, capsys, argv, *words)


def test_gpu_check_reports_a_failing_check_and_goes_on(capsys, monkeypatch):
    def broken(spec):
        raise RuntimeError("the LADD step case failed:\nCUDA out of memory")
    monkeypatch.setattr(bench, "run_ladd_case", broken)
    with pytest.raises(SystemExit) as e:
        bench.main(["gpu-check", "--dry-run", "--skip-train"])
    assert e.value.code == 1
    header, rows = last_table(capsys.readouterr().out)
    assert [r[1] for r in rows] == ["ok", "ok", "ok", "FAIL", "ok"]
    assert "out of memory" in rows[3][2] and "python" in rows[4][0]

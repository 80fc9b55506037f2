"""The project's invariants, which features must not erode: train_ladd.py stays short and the
plain LADD step fits on one screen; the README is a front page; the LADD box lives in one place."""

import ast
import os

import train_ladd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def code_lines(source, function):
    """The lines of `function`'s body in `source`, without its docstring, blank lines and comments."""
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == function)
    body = node.body[1:] if ast.get_docstring(node) is not None else node.body
    lines = source.split("\n")[body[0].lineno - 1:node.end_lineno]
    return [line for line in lines if line.strip() and not line.strip().startswith("#")]


def ladd_box(text):
    """The algorithm box: the lines from `  data ` to the `  heads ` line."""
    lines = text.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("  data "))
    end = next(i for i, line in enumerate(lines) if line.startswith("  heads "))
    return lines[start:end + 1]


def test_train_ladd_stays_within_400_lines():
    assert len(read("train_ladd.py").split("\n")) - 1 <= 400


def test_the_plain_student_step_reads_in_25_lines_with_its_backward_in_view():
    lines = code_lines(read("train_ladd.py"), "student_step")
    assert len(lines) <= 25, f"student_step has {len(lines)} lines of code"
    text = "\n".join(lines)
    for call in ("opt.zero_grad(", "loss.backward()", "clip_grad_norm(", "opt.step()"):
        assert text.count(call) == 1, call
    assert "training.update" not in text  # the update is not hidden in another file


def test_the_readme_is_a_front_page_of_at_most_12_kb():
    assert len(read("README.md").encode()) <= 12 * 1024


def test_the_readme_shows_the_reading_order_within_its_first_120_lines():
    lines = read("README.md").split("\n")
    assert "## Reading order" in lines[:120]


def test_the_ladd_box_is_quoted_verbatim_in_the_readme_and_written_nowhere_else():
    box = ladd_box(train_ladd.__doc__)
    assert len(box) >= 6
    assert ladd_box(read("README.md")) == box
    for name in ("docs/ladd.md", "exercises/README.md"):
        assert box[0] not in read(name), f"{name} repeats the box: link to train_ladd.py instead"

"""
Classroom exercises made from ladd's own code: each one removes real functions from a copy of the
project, and the student writes them back until the exercise's grader passes.

    python exercises/exercises.py list                               # the exercises, in order
    python exercises/exercises.py copy --out ../ladd-student         # a copy, every exercise stubbed
    python exercises/exercises.py copy --out ../ladd-student --exercise hinge-losses
    cd ../ladd-student && python exercises/exercises.py grade hinge-losses

The solution is always the project's own code: `copy` replaces each function an exercise names
(found by its name in the source, so the project's files carry no markers) with its signature,
its docstring and a `raise NotImplementedError` that says what to write. Everything else in the
copy still runs. `grade` loads the modules of the folder it lives in and runs the exercise's
checks (exercises/graders.py): exact values worked out by hand, reference outputs of the project's
code on fixed inputs (exercises/reference.safetensors, remade with `record` in the project), and
the behaviour whole classes of wrong answers break. The student's sheet is exercises/README.md,
the teacher's guide exercises/TEACHER.md, the answers exercises/ANSWERS.md. A copy leaves out
those two and tests/ (the tests spell out the functions the exercises remove).
"""

import argparse
import ast
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from types import SimpleNamespace

import graders  # exercises/graders.py, beside this file (on the path when it runs)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SKIP = {".git", "runs", "eval", "samples", "inpaint", "out", "__pycache__", ".pytest_cache"}
# never in a student's copy: the answers, the teacher's guide, and the tests (they spell out the
# very functions the exercises remove, and tests/test_exercises.py lists typical wrong answers)
LEFT_OUT = ("exercises/ANSWERS.md", "exercises/TEACHER.md", "tests/")
MARKER = os.path.join("exercises", "copy.json")  # in a copy: what was stubbed; `record` refuses


@dataclass
class Exercise:
    name: str
    targets: tuple   # ("file.py", "function" or "Class.method"), the code the student writes
    minutes: int     # time for a student who has read the files before it in the reading order
    task: str        # what to write: the stub's message and the sheet's text
    needs: tuple = ()  # exercises whose code this one's grader runs: do them first


# In the order a class does them (the README's table, TEACHER.md, `list` and `grade all`); every
# exercise comes after the ones it needs (a test checks both).
EXERCISES = [
    Exercise("flow-noising", (("flow.py", "add_noise"), ("flow.py", "velocity_target"),
                              ("flow.py", "x0_from_v")), 20,
             "Rectified flow's three formulas: x_t = (1 - t) x0 + t eps (t a float or one value "
             "per sample), the velocity target v = eps - x0, and x0_hat = x_t - t v. Keep the "
             "latents' dtype and the autograd graph. See the conventions at the top of flow.py."),
    Exercise("sd3-schedule", (("flow.py", "shift_t"), ("flow.py", "sd3_sigmas")), 30,
             "SD3's resolution shift sigma' = s t / (1 + (s - 1) t), and the sampling schedule: "
             "steps + 1 sigmas from 1 to 0, the endpoints taken from a 1000-entry shifted table "
             "and the shift applied again to the interpolated timesteps (shift 3, 4 steps: "
             "[1.0, 0.85769, 0.60215, 0.00893, 0]); the docstring has every detail."),
    Exercise("renoise-sampler", (("flow.py", "sampler_step"),), 20,
             "One sampler step from noise level s to s_next: euler x + (s_next - s) v; renoise: "
             "the prediction x0_hat = x - s v re-noised to s_next with fresh noise eps, "
             "(1 - s_next) x0_hat + s_next eps (no noise at s_next = 0)."),
    Exercise("timestep-embedding", (("mmdit.py", "timestep_embedding"),), 15,
             "Sinusoidal features of timesteps t [B] (already multiplied by 1000) -> [B, dim] "
             "float32: half = dim / 2 frequencies exp(-ln(max_period) k / half), k = 0..half-1; "
             "the cosines of t * frequency first, then the sines."),
    Exercise("joint-attention", (("mmdit.py", "JointBlock.forward"),), 30,
             "One MMDiT joint block: both streams' pre_attention (their own modulation and q, k, "
             "v), ONE attention over the text tokens followed by the image tokens, the result split "
             "back and each stream's post_attention. The last block's text stream is pre-only: it "
             "lends its keys and values and returns None."),
    Exercise("discriminator-head", (("discriminator.py", "DiscriminatorHead.forward"),), 30,
             "A head's forward pass, the five equations in discriminator.py's docstring: the "
             "conditioning c from t_hat (x1000, sinusoidal) and the pooled text, the 1x1 input "
             "conv, the two residual blocks, SiLU(GroupNorm), and the logit: the spatial mean of "
             "logit_out plus the projection term <mean_space(h), proj_embed(c)> / sqrt(hidden).",
             needs=("timestep-embedding",)),
    Exercise("hinge-losses", (("discriminator.py", "hinge_heads_loss"),
                              ("discriminator.py", "hinge_student_loss")), 15,
             "The hinge losses over lists of per-head logits, summed over EVERY head: the heads' "
             "mean(relu(1 - real)) + mean(relu(1 + fake)); the student's -mean(fake). Return a "
             "tensor that keeps the autograd graph."),
    Exercise("inpainting-input", (("inpainting.py", "known_channels"),
                                  ("inpainting.py", "with_known")), 15,
             "An inpainting model's input: the extra channels [mask | known latent zeroed where "
             "it is repainted], appended after the noisy latent (or the latent alone when there "
             "is nothing known).",
             needs=("timestep-embedding", "joint-attention")),
    Exercise("student-step", (("train_ladd.py", "student_step"),), 45,
             "One student update, as the docstring lists it: x_t, the student's x0_hat, the fake "
             "batch re-noised to t_hat, the frozen teacher's features of it WITH autograd (the "
             "gradient must flow through the teacher into the student), the heads' logits and "
             "the hinge loss, plus weight * value for each term of addons.student_terms (none in "
             "plain LADD); then zero_grad, backward, training.clip_grad_norm and opt.step only "
             "when that norm is finite. Heads frozen during the step only; b.input(...) for "
             "what the student and the teacher read; the statistics the docstring lists.",
             needs=("flow-noising", "timestep-embedding", "joint-attention", "discriminator-head",
                    "hinge-losses", "inpainting-input")),
]
BY_NAME = {e.name: e for e in EXERCISES}


# ----------------------------------------------------------------------------------------------
# rewriting functions in source text


def _find(tree, qualname):
    """The FunctionDef for 'name' or 'Class.name' in a module's AST."""
    nodes, node = tree.body, None
    for part in qualname.split("."):
        node = next((n for n in nodes if isinstance(n, (ast.FunctionDef, ast.ClassDef))
                     and n.name == part), None)
        if node is None:
            raise ValueError(f"{qualname}: no such function in the source")
        nodes = node.body
    return node


def stub(source, qualname, message):
    """source with the body of `qualname` (after its docstring) replaced by a raise."""
    node = _find(ast.parse(source), qualname)
    body = node.body[1:] if ast.get_docstring(node) is not None else node.body
    lines = source.split("\n")
    indent = " " * body[0].col_offset
    parts = textwrap.wrap(message, 88 - len(indent), drop_whitespace=False)
    raise_ = [f"{indent}raise NotImplementedError("] + [f"{indent}    {json.dumps(p)}" for p in parts]
    raise_[-1] += ")"
    return "\n".join(lines[:body[0].lineno - 1] + raise_ + lines[node.end_lineno:])


def replace(source, qualname, new):
    """source with the whole definition of `qualname` replaced by `new` (any indentation)."""
    node = _find(ast.parse(source), qualname)
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    lines = source.split("\n")
    code = textwrap.indent(textwrap.dedent(new).strip("\n"), " " * node.col_offset)
    return "\n".join(lines[:first - 1] + code.split("\n") + lines[node.end_lineno:])


def stub_message(exercise):
    return (f"exercise {exercise.name}: {exercise.task} Grade it with: python exercises/"
            f"exercises.py grade {exercise.name}")


# ----------------------------------------------------------------------------------------------
# the student's copy


def left_out(path):
    """Whether the project file `path` (relative, with /) stays out of a student's copy."""
    return any(path == x or (x.endswith("/") and path.startswith(x)) for x in LEFT_OUT)


def copy(out, names=None, replacements=(), python_only=False):
    """A copy of the project in `out` with the exercises `names` (default: all) stubbed.
    replacements: (file, qualname, source) to put in instead (the tests' wrong answers).
    python_only: copy the .py files and exercises/ alone, and link assets/ (fast, for tests)."""
    names = [e.name for e in EXERCISES] if names is None else list(names)
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise ValueError(f"unknown exercise {unknown[0]!r}; choose from {', '.join(BY_NAME)}")
    if os.path.exists(out) and os.listdir(out):
        raise ValueError(f"--out {out} exists and is not empty; pass a new folder")
    work = f"{out.rstrip(os.sep)}.tmp-{os.getpid()}"  # built aside, then renamed: never half made
    shutil.rmtree(work, ignore_errors=True)
    try:
        files = [p for p in sorted(set(_project_files(python_only))) if not left_out(p)]
        for path in files:
            os.makedirs(os.path.dirname(os.path.join(work, path)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, path), os.path.join(work, path))
        if python_only:
            os.symlink(os.path.join(ROOT, "assets"), os.path.join(work, "assets"))
        changes = [(f, q, BY_NAME[n], None) for n in names for f, q in BY_NAME[n].targets]
        changes += [(f, q, None, new) for f, q, new in replacements]
        for file, qualname, exercise, new in changes:
            _edit(work, file, lambda source: stub(source, qualname, stub_message(exercise))
                  if exercise else replace(source, qualname, new))
        for path in files:
            if path.endswith(".md"):
                _edit(work, path, lambda text: unlink_left_out(text, os.path.dirname(path)))
        with open(os.path.join(work, MARKER), "w", encoding="utf-8") as f:
            json.dump({"stubbed": names}, f, indent=1)
        if os.path.isdir(out):
            os.rmdir(out)  # empty, checked above
        os.rename(work, out)
    except OSError as e:
        shutil.rmtree(work, ignore_errors=True)
        raise ValueError(f"--out {out}: cannot write there ({e.strerror or e}); pass a folder "
                         f"you can write to") from None
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out


def _edit(root, path, change):
    with open(os.path.join(root, path), encoding="utf-8") as f:
        text = f.read()
    with open(os.path.join(root, path), "w", encoding="utf-8") as f:
        f.write(change(text))


def unlink_left_out(text, folder):
    """Markdown text with each link to a file that a copy leaves out turned into plain text that
    says so: `[the guide](TEACHER.md)` -> `the guide (not in a student's copy)`."""
    def plain(match):
        target = os.path.normpath(os.path.join(folder, match.group(2).split("#")[0]))
        if not left_out(target.replace(os.sep, "/") + ("/" if target == "tests" else "")):
            return match.group(0)
        return f"{match.group(1)} (not in a student's copy)"
    return re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", plain, text)


def needs_notes(names):
    """For a copy stubbing `names`: one line per exercise that needs another one also stubbed."""
    notes = []
    for e in EXERCISES:
        first = [n for n in e.needs if n in names]
        if e.name in names and first:
            notes.append(f"{e.name} runs the code of {', '.join(first)}: do "
                         f"{'it' if len(first) == 1 else 'them'} first")
    return notes


def _project_files(python_only):
    if not python_only and os.path.isdir(os.path.join(ROOT, ".git")):
        listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
        if listed.returncode == 0:
            return [p for p in listed.stdout.splitlines() if os.path.isfile(os.path.join(ROOT, p))]
    files = []
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if d not in SKIP)
        rel = os.path.relpath(folder, ROOT)
        if python_only and rel not in (".", "exercises"):
            continue
        files += [os.path.normpath(os.path.join(rel, n)) for n in sorted(names)
                  if not python_only or n.endswith((".py", ".safetensors", ".md"))]
    return files


# ----------------------------------------------------------------------------------------------
# loading a copy's modules and grading


def project_modules(root):
    return {f[:-3] for f in os.listdir(root) if f.endswith(".py")}


def load(root):
    """The project modules of folder `root`, imported afresh (the modules already imported stay
    as they were): a namespace with an attribute per module, e.g. m.flow, m.train_ladd."""
    names = project_modules(root)
    saved = {n: sys.modules.pop(n) for n in list(sys.modules) if n in names}
    sys.path.insert(0, root)
    importlib.invalidate_caches()
    try:
        return SimpleNamespace(**{n: importlib.import_module(n) for n in sorted(names)})
    finally:
        sys.path.remove(root)
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(saved)


def grade(name, root=ROOT, record=None, done=None):
    """Run exercise `name`'s checks on the code in `root` -> [(check, error message or None)].
    First, one result per exercise it needs whose grader fails (`done` caches those verdicts).
    record: a dict to fill with the reference outputs instead of comparing with them."""
    m, done = load(root), {} if done is None else done
    results = []
    for need in BY_NAME[name].needs:
        if need not in done:
            done[need] = not any(err for _, err in graders.run(need, m, record))
        if not done[need]:
            results.append((f"needs {need} done first", f"exercise {need}'s grader fails, and this "
                            f"one runs its code: do it first (python exercises/exercises.py grade "
                            f"{need})"))
    results += graders.run(name, m, record)
    done[name] = not any(err for _, err in results)
    return results


def main(argv=None):
    p = argparse.ArgumentParser(prog="exercises.py", description=__doc__.split("\n\n")[0].strip())
    sub = p.add_subparsers(dest="what", required=True)
    sub.add_parser("list", help="the exercises in order, their functions, times and what each needs")
    c = sub.add_parser("copy", help="a copy of the project with exercises stubbed")
    c.add_argument("--out", required=True, help="a new folder")
    c.add_argument("--exercise", action="append", choices=list(BY_NAME),
                   help="repeat for several (default: every exercise)")
    g = sub.add_parser("grade", help="run an exercise's grader on this folder's code")
    g.add_argument("exercise", choices=list(BY_NAME) + ["all"],
                   help="an exercise's name (see `list`), or all of them in order")
    sub.add_parser("record", help="remake exercises/reference.safetensors from the project's code "
                                  "(in the project only, never in a student's copy)")
    a = p.parse_args(argv)
    if a.what == "list":
        stubbed = None
        if os.path.exists(os.path.join(ROOT, MARKER)):  # a student's copy: mark its exercises
            with open(os.path.join(ROOT, MARKER), encoding="utf-8") as f:
                stubbed = json.load(f)["stubbed"]
        for e in EXERCISES:
            where = ", ".join(f"{f}:{q}" for f, q in e.targets)
            needs = f"  (after {', '.join(e.needs)})" if e.needs else ""
            mark = "" if stubbed is None else ("* " if e.name in stubbed else "  ")
            print(f"{mark}{e.name:20} {e.minutes:3d} min  {where}{needs}")
        if stubbed is not None:
            print("* removed from this copy: yours to write")
    elif a.what == "copy":
        try:
            copy(a.out, a.exercise)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        names = a.exercise or list(BY_NAME)
        print(f"wrote {a.out}: {', '.join(names)} stubbed; the sheet is "
              f"{os.path.join(a.out, 'exercises', 'README.md')}")
        for note in needs_notes(names):
            print(f"note: {note}")
    elif a.what == "grade":
        names = list(BY_NAME) if a.exercise == "all" else [a.exercise]
        failed, done = 0, {}
        for name in names:
            results = grade(name, done=done)
            failed += any(err for _, err in results)
            for check, err in results:
                print(f"{name}: {'ok  ' if err is None else 'FAIL'} {check}"
                      + ("" if err is None else f"\n      {err}"))
        print("all checks pass" if not failed else f"{failed} exercise(s) not done yet")
        return 1 if failed else 0
    else:
        if os.path.exists(os.path.join(ROOT, MARKER)):
            raise SystemExit(f"error: this is a student's copy ({MARKER}): `record` remakes the "
                             f"reference outputs from the project's own code; run it there")
        recorded = {}
        for name in BY_NAME:
            bad = [(c, e) for c, e in grade(name, ROOT, recorded) if e]
            if bad:
                raise SystemExit(f"error: the project's own code fails {name}: {bad[0]}")
        graders.save_reference(recorded)
        print(f"wrote {graders.REFERENCE}: {len(recorded)} tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Docs that cannot drift.

1. Every shell command in README.md, docs/*.md and exercises/*.md that runs one of the project's
   scripts (in ```bash / ``` blocks, and `python script.py ...` spans in the prose) is parsed and
   checked by that script's own option code, exactly as a user who pastes it would be answered
   before any work: its `main(argv)` runs with the work replaced by a stop (SCRIPTS below says
   where each script stops). An unknown option, a bad value, preset or choice fails the test
   named after the file and line of the command. Nothing is trained, sampled or loaded.
2. The README's file table (a `lines` column next to file names) states each file's real line
   count (`wc -l`).

The docs are read when the tests are collected, so whatever README.md and docs/ say today is
what is checked. The self-tests at the end check that each check can fail, on doctored copies in
tmp_path (the real files are never touched).
"""
import argparse
import dataclasses
import glob
import importlib
import inspect
import os
import re
import shlex
import sys
from contextlib import contextmanager

import pytest
import torch

import cli
import images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("README.md", "docs/*.md", "exercises/*.md")
SHELL_FENCES = {"", "bash", "sh", "shell", "console", "zsh"}
COMMAND = re.compile(r"^(?:[A-Za-z_]\w*=\S*\s+)*(?:python3?|torchrun)\s")  # what starts a command
ELLIPSIS = "\x00..."     # a bare `...` in a command: options left out on purpose
PLACEHOLDER = "\x00"     # + NAME: `--seed S`, `--out RUN`, `--ckpt $T` with T unset: any value


# ----------------------------------------------------------------------------------------------
# commands in the docs


@dataclasses.dataclass
class Command:
    path: str                # the doc, relative to the repository root
    line: int                # 1-based line of the command's first line
    text: str                # the command as written (continuations joined)
    script: str = ""         # the script it runs, relative to the root ("": a tokenizing error)
    argv: list = dataclasses.field(default_factory=list)
    error: str = ""          # the command could not be read as shell

    @property
    def where(self):
        return f"{self.path}:{self.line}"

    @property
    def partial(self):
        """Options left out (`...`): only the options given can be checked."""
        return ELLIPSIS in self.argv

    def shown(self):
        return " ".join(a[1:] if a.startswith(PLACEHOLDER) else a for a in self.argv)


def doc_files(root=ROOT):
    return sorted({p for pattern in DOCS for p in glob.glob(os.path.join(root, pattern))})


def shell_snippets(text):
    """Markdown text -> [(line, shell text, fence id or None)]: each logical line of a shell
    fence (a trailing backslash joins the next line), and each inline code span that starts
    with a command (`python x.py ...`, `torchrun ...`, `VAR=1 python ...`)."""
    lines = text.splitlines()
    out, prose, fence, block, i = [], [], None, 0, 0
    while i < len(lines):
        line = lines[i]
        opening = re.match(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)", line)
        if fence is None and opening:
            fence, block = (opening.group(1), opening.group(2).lower()), block + 1
            prose.append((i + 1, ""))  # a fence ends a paragraph
            i += 1
            continue
        if fence is not None:
            if re.match(r"^\s*" + re.escape(fence[0][0]) + "{%d,}\\s*$" % len(fence[0]), line):
                fence = None
                i += 1
                continue
            if fence[1] in SHELL_FENCES:
                start, joined = i + 1, line
                while joined.rstrip().endswith("\\") and i + 1 < len(lines):
                    i += 1
                    joined = joined.rstrip()[:-1] + " " + lines[i].strip()
                joined = re.sub(r"^\s*\$\s+", "", joined).strip()  # a console prompt
                # a bare ``` block holds output and pseudo-code too: only its command lines
                if joined and (fence[1] or COMMAND.match(joined + " ")):
                    out.append((start, joined, block))
            i += 1
            continue
        prose.append((i + 1, line))
        i += 1
    # inline spans, paragraph by paragraph (a span may wrap onto the next line)
    paragraph = []
    for number, line in prose + [(0, "")]:
        if line.strip():
            paragraph.append((number, line))
            continue
        if paragraph:
            first, joined = paragraph[0][0], "\n".join(l for _, l in paragraph)
            for m in re.finditer(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", joined, re.S):
                span = " ".join(m.group(2).split())
                if COMMAND.match(span + " "):
                    out.append((first + joined.count("\n", 0, m.start()), span, None))
        paragraph = []
    return sorted(out, key=lambda s: s[0])


def _tokens(text):
    """Shell words and operators; `#` comments dropped; a bare `...` becomes ELLIPSIS; the file
    descriptor of a redirection (`2>&1`) goes with it."""
    text = re.sub(r"(?<!\S)\.\.\.(?=\s|$)", ELLIPSIS, text)
    text = re.sub(r"(?<!\S)\d+(?=[<>])", "", text)
    lex = shlex.shlex(text, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    return [w if w == ELLIPSIS else w.replace(ELLIPSIS, "...") for w in lex]  # a quoted ... stays


def _expand(text, variables):
    """$NAME / ${NAME} -> the value set earlier in the same block (word-split like the shell);
    an unset one -> a placeholder."""
    def value(m):
        name = m.group(1) or m.group(2)
        return variables[name] if name in variables else PLACEHOLDER + name
    return re.sub(r"\$(?:(\w+)|\{(\w+)\})", value, text)


def _script_of(words):
    """The words of one simple command -> (script, argv), or None for anything that does not
    run a script file (pip, cd, git, python -m pytest, python -c ...)."""
    program = os.path.basename(words[0])
    i = 1
    if re.fullmatch(r"python(3(\.\d+)?)?", program):
        while i < len(words) and words[i].startswith("-"):
            if words[i] in ("-m", "-c"):
                return None
            i += 2 if words[i] in ("-X", "-W") else 1
    elif program == "torchrun":
        while i < len(words) and not words[i].endswith(".py"):
            if words[i] in ("-m", "--module", "--no-python", "--no_python"):
                return None
            i += 1
    else:
        return None
    if i >= len(words) or not words[i].endswith(".py"):
        return None
    return os.path.normpath(words[i]), words[i + 1:]


def _mark_placeholders(argv):
    """An option's value written as a placeholder (`--seed S`, `--out RUN`, `--ckpt=X`) stands
    for any value of the reader's: it becomes PLACEHOLDER + name (see _place_placeholders)."""
    out = []
    for word in argv:
        option, eq, value = word.partition("=")
        if eq and option.startswith("--") and re.fullmatch(r"[A-Z][A-Z0-9_]*", value):
            out += [option, PLACEHOLDER + value]
        elif out and out[-1].startswith("--") and "=" not in out[-1] \
                and re.fullmatch(r"[A-Z][A-Z0-9_]*", word):
            out.append(PLACEHOLDER + word)
        else:
            out.append(word)
    return out


def commands_in(text, path):
    """The commands of one doc that run a script file -> [Command]."""
    found, variables, last_block = [], {}, None
    for line, shell, block in shell_snippets(text):
        if block != last_block:
            variables, last_block = {}, block  # variables live within their code block
        try:
            words = _tokens(_expand(shell, variables if block is not None else {}))
        except ValueError as e:  # an unclosed quote
            if re.search(r"(?<![\w/.-])(python3?|torchrun)\s", shell):
                found.append(Command(path, line, shell, error=f"not valid shell ({e})"))
            continue
        simple = [[]]
        for w in words:
            if w and all(c in "();<>|&" for c in w):
                simple.append([] if not any(c in "<>" for c in w) else None)  # a redirect: drop the rest
            elif simple[-1] is not None:
                simple[-1].append(w)
        for words in filter(None, simple):
            env = 0
            while env < len(words) and re.match(r"^[A-Za-z_]\w*=", words[env]):
                env += 1
            if words[:1] == ["export"] or env == len(words):  # NAME=value: a variable
                for w in words[words[:1] == ["export"]:]:
                    name, _, value = w.partition("=")
                    variables[name] = shlex.quote(value) if value and " " not in value else value
                continue
            script = _script_of(words[env:])
            if script is None:
                continue
            found.append(Command(path, line, shell, script[0], _mark_placeholders(script[1])))
    return found


def documented_commands(root=ROOT):
    found = []
    for path in doc_files(root):
        with open(path, encoding="utf-8") as f:
            found += commands_in(f.read(), os.path.relpath(path, root))
    return found


# ----------------------------------------------------------------------------------------------
# how each script parses and checks its options, stopping before any work


class Stop(Exception):
    """The script got past its option checks: the next step would be work (the message says
    where it stopped)."""


def _stop_at(where):
    def stop(*args, **kwargs):
        raise Stop(f"stopped at {where}")
    return stop


@contextmanager
def _cwd(path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _place_placeholders(monkeypatch):
    """Every argparse parser (cli.parse_config's, bench.py's, exercises.py's) places the
    placeholders of the options it knows: a text option takes the placeholder's name as its value
    (`--out RUN`, `--ckpt X`), any other (a number, a choice) is left out, so its default applies
    (`--seed S`); a bare `...` is dropped, with the option before it if that takes a value. An
    option a parser does not know stays, so it is still refused (by it or by a subparser)."""
    real = argparse.ArgumentParser.parse_known_args

    def parse_known_args(self, args=None, namespace=None):
        if args is not None:
            kept = []
            for a in args:
                action = self._option_string_actions.get(kept[-1]) if kept else None
                takes_value = action is not None and action.nargs != 0
                if a == ELLIPSIS:
                    if takes_value:
                        kept.pop()
                elif a.startswith(PLACEHOLDER) and takes_value:
                    if action.type in (None, str) and not action.choices:
                        kept.append(a[len(PLACEHOLDER):])
                    else:
                        kept.pop()
                else:
                    kept.append(a)
            args = kept
        return real(self, args, namespace)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", parse_known_args)


def _parse_only(monkeypatch):
    """cli.parse_config parses only the options given (no required ones), then stops."""
    real = cli.parse_config
    signature = inspect.signature(real)

    def parse_config(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.arguments["given_only"] = True
        real(*bound.args, **bound.kwargs)
        raise Stop("parsed only: options left out (...)")
    monkeypatch.setattr(cli, "parse_config", parse_config)


def _any_machine(monkeypatch):
    """--device cuda / mps are checked as names, not against this machine."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    mps = getattr(torch.backends, "mps", None)
    if mps is not None:
        monkeypatch.setattr(mps, "is_available", lambda: True)


def _inputs_need_not_exist(monkeypatch):
    """Files a command reads or writes (runs/..., prompts.txt, images) need not exist here:
    a missing one is stood in for; one that exists is read as the script would read it."""
    read_prompts, load_image, load_mask = cli.read_prompts, images.load_image, images.load_mask

    def prompts(items, option="--prompt"):
        return [p for item in items for p in
                ([item] if item.endswith(".txt") and not os.path.isfile(item)
                 else read_prompts([item], option))]
    monkeypatch.setattr(cli, "read_prompts", prompts)
    monkeypatch.setattr(cli, "check_out_folder", lambda folder, option="--out": None)
    monkeypatch.setattr(images, "load_image", lambda path, width=None, height=None: (
        load_image(path, width, height) if os.path.isfile(path)
        else torch.zeros(3, height or 64, width or 64)))
    monkeypatch.setattr(images, "load_mask", lambda path: (
        load_mask(path) if os.path.isfile(path) else torch.zeros(1, 64, 64)))


def _import(script):
    """A script file (relative to the root) -> its module, imported as its tests import it."""
    folder, name = os.path.split(script)
    if folder:
        path = os.path.join(ROOT, folder)
        if path not in sys.path:
            sys.path.insert(0, path)
    module = importlib.import_module(name[:-3])
    assert os.path.samefile(module.__file__, os.path.join(ROOT, script)), \
        f"importing {name[:-3]} gave {module.__file__}, not {script}"
    return module


def until(*boundaries, inputs=()):
    """sample.py, inpaint.py, evaluate.py, text_encoders.py: main(argv) runs its checks and stops
    at its first loading step (`boundaries`: (module name, attribute), replaced by a stop;
    module "": the script's own).
    inputs: options naming files that must exist (evaluate's --ckpt), taken as existing."""
    def run(module, argv, monkeypatch, tmp_path):
        for owner, attr in boundaries:
            target = module if owner == "" else sys.modules.get(owner) or importlib.import_module(owner)
            for part in attr.split(".")[:-1]:
                target = getattr(target, part)
            monkeypatch.setattr(target, attr.split(".")[-1], _stop_at(f"{owner or module.__name__}.{attr}"))
        _any_machine(monkeypatch)
        _inputs_need_not_exist(monkeypatch)
        words = [a.replace(PLACEHOLDER, "") for a in argv]
        given = {words[i + 1] for i, a in enumerate(words[:-1]) if a in ("--" + o for o in inputs)}
        given |= {a.split("=", 1)[1] for a in words if any(a.startswith(f"--{o}=") for o in inputs)}
        if given:
            exists = os.path.exists
            monkeypatch.setattr(os.path, "exists", lambda p: exists(p) or p in given)
        module.main(argv)
    return run


def training_script(*boundaries):
    """train_ladd.py, train_teacher.py: cli.training_main's own parse and preset lookup
    (resolve_config, run in an empty folder: a run already in --out here is no doc error), then
    train(config), whose first step checks every value, until its first step of work
    (`boundaries`, as for `until`). A --resume command stops after the parse: its settings are in
    a run folder that does not exist here."""
    then = until(*boundaries)

    def run(module, argv, monkeypatch, tmp_path):
        resolve = cli.resolve_config

        def resolve_config(cls, presets, given, *args, **kwargs):
            if given.get("resume"):
                raise Stop("parsed only: --resume")
            with _cwd(tmp_path):
                return resolve(cls, presets, given, *args, **kwargs)
        monkeypatch.setattr(cli, "resolve_config", resolve_config)
        then(module, argv, monkeypatch, tmp_path)
    return run


def parse_then_stop(run_name="run"):
    """bench.py, tests/bench_diffusers.py: run_cli(parse_args, run): the parse, then `run`
    replaced by a stop."""
    def run(module, argv, monkeypatch, tmp_path):
        monkeypatch.setattr(module, run_name, _stop_at(f"{module.__name__}.{run_name}"))
        module.main(argv)
    return run


def argparse_then_stop(module, argv, monkeypatch, tmp_path):
    """exercises/exercises.py: main builds its argparse parser and runs the subcommand at once,
    so the parse itself is stopped after (argparse.ArgumentParser.parse_args, which its
    subparsers do not call)."""
    real = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        real(self, args, namespace)
        raise Stop("parsed (argparse)")
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    module.main(argv)


def no_options(module, argv, monkeypatch, tmp_path):
    """A module whose `__main__` prints something and reads no options (lora.py,
    discriminator.py, tests/test_layout.py): any option written after it is ignored, a doc error."""
    if argv:
        raise ValueError(f"it takes no options (its __main__ reads none), got: {' '.join(argv)}")
    raise Stop("no options")


# the first step of work in train(), after its checks (and, should a change put a load first,
# the loads: a stop there still runs no model)
TRAINING = training_script(("training", "init_world"), ("pipeline", "load_pipeline"),
                           ("mmdit", "MMDiT.from_pretrained"), ("vae", "VAE.from_pretrained"))

# script (relative to the root) -> how its options are parsed and checked, up to where it stops
SCRIPTS = {
    "train_ladd.py": TRAINING,
    "train_teacher.py": TRAINING,
    "sample.py": until(("pipeline", "load_pipeline")),
    "inpaint.py": until(("pipeline", "load_pipeline")),
    "edit.py": until(("pipeline", "load_pipeline")),
    "evaluate.py": until(("pipeline", "load_pipeline"), inputs=("ckpt",)),
    "text_encoders.py": until(("", "SD3TextEncoder.from_pretrained")),
    "bench.py": parse_then_stop(),
    "tests/bench_diffusers.py": parse_then_stop(),
    "exercises/exercises.py": argparse_then_stop,
    "tests/tiny_sd3.py": argparse_then_stop,
    "lora.py": no_options,
    "discriminator.py": no_options,
    "tests/test_layout.py": no_options,
}


def refusal(command, monkeypatch, tmp_path, capsys, accepted=None):
    """None if the command's script accepts it, else why not (its one-line error). accepted: a
    list to append how far an accepted command got."""
    if command.error:
        return command.error
    check = SCRIPTS.get(command.script)
    if check is None:
        if not os.path.isfile(os.path.join(ROOT, command.script)):
            return f"there is no {command.script} in the repository"
        return (f"{command.script} has no entry in SCRIPTS in tests/test_docs.py: add how its "
                f"options are parsed and checked")
    monkeypatch.chdir(ROOT)
    module = _import(command.script) if check is not no_options else None
    _place_placeholders(monkeypatch)
    if command.partial and check is not no_options:
        _parse_only(monkeypatch)
    argv = [a for a in command.argv if a != ELLIPSIS] if check is no_options else command.argv
    capsys.readouterr()
    try:
        with monkeypatch.context() as m:
            m.setattr(sys, "argv", [command.script])
            check(module, argv, m, tmp_path)
    except Stop as e:
        if accepted is not None:
            accepted.append(str(e))
        return None
    except SystemExit as e:
        if e.code in (0, None):  # --help
            if accepted is not None:
                accepted.append("exit 0 (--help)")
            return None
        err = capsys.readouterr().err.strip().replace(PLACEHOLDER, "")  # a placeholder as written
        return err.splitlines()[-1] if err else f"exit code {e.code}"
    except ValueError as e:  # a check called outside run_cli
        return f"error: {cli.one_line(e)}".replace(PLACEHOLDER, "")
    return "main(argv) returned without stopping: it did the work (see SCRIPTS)"


COMMANDS = documented_commands()


def test_the_docs_have_commands():
    assert COMMANDS, f"no `python script.py ...` commands found in {', '.join(DOCS)}"


@pytest.mark.parametrize("command", COMMANDS, ids=[c.where for c in COMMANDS])
def test_documented_command_is_accepted(command, monkeypatch, tmp_path, capsys):
    why = refusal(command, monkeypatch, tmp_path, capsys)
    assert why is None, (f"{command.where}: the documented command\n    {command.text}\n"
                         f"is refused by {command.script}: {why}")


# ----------------------------------------------------------------------------------------------
# the README's file table


def line_count(path):
    """`wc -l`: the newline characters."""
    with open(path, "rb") as f:
        return f.read().count(b"\n")


def _cells(row):
    return [c.strip() for c in row.strip().strip("|").split("|")]


def file_table_rows(text):
    """Markdown tables with a `lines` column and a file column -> [(line, file, stated count
    text)] for every row that states a count."""
    lines, rows, i = text.splitlines(), [], 0
    while i < len(lines):
        if not (lines[i].lstrip().startswith("|") and i + 1 < len(lines)
                and re.match(r"^\s*\|?\s*:?-{3,}", lines[i + 1])):
            i += 1
            continue
        header = [re.sub(r"[*_`]", "", c).lower() for c in _cells(lines[i])]
        count_col = next((k for k, h in enumerate(header) if re.search(r"\blines\b", h)), None)
        file_col = next((k for k, h in enumerate(header) if re.fullmatch(r"files?|path", h)), None)
        i += 2
        while i < len(lines) and lines[i].lstrip().startswith("|"):
            cells = _cells(lines[i])
            if count_col is not None and count_col < len(cells):
                files = ([cells[file_col]] if file_col is not None and file_col < len(cells)
                         else [c for c in cells if re.fullmatch(r"`[^`]+`", c)])
                name = re.fullmatch(r"\**`([^`]+)`\**", files[0]) if files else None
                count = cells[count_col].strip("* ~")
                if name and count:
                    rows.append((i + 1, name.group(1), count))
            i += 1
    return rows


def count_problems(rows, root=ROOT, readme="README.md"):
    """[(line, file, stated)] -> one message per stated count that is not the file's."""
    problems = []
    for line, name, stated in rows:
        path = os.path.join(root, name)
        if not os.path.isfile(path):
            problems.append(f"{readme}:{line}: {name} states {stated} lines, but there is no such file")
        elif not re.fullmatch(r"\d+", stated.replace(",", "")):
            problems.append(f"{readme}:{line}: {name}: {stated!r} is not a line count")
        elif int(stated.replace(",", "")) != line_count(path):
            problems.append(f"{readme}:{line}: {name} has {line_count(path)} lines, the table says {stated}")
    return problems


def _readme_rows(root=ROOT):
    path = os.path.join(root, "README.md")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return file_table_rows(f.read())


ROWS = _readme_rows()
NO_TABLE = ("README.md has no file table: a markdown table with a `lines` column and file names "
            "in backticks (| `train_ladd.py` | 628 | ...), whose counts this test checks")


def test_the_readme_has_a_file_table():
    assert ROWS, NO_TABLE


@pytest.mark.parametrize("row", ROWS, ids=[f"README.md:{r[0]}:{r[1]}" for r in ROWS])
def test_readme_line_count(row):
    problems = count_problems([row])
    assert not problems, problems[0]


# ----------------------------------------------------------------------------------------------
# the checks can fail: doctored copies in tmp_path


# (a documented command, a word its refusal must name; None: it must be accepted)
DOCTORED = [
    ("python train_ladd.py --steps 10 \\\n    --no-such-option 1     # a bogus option", "--no-such-option"),
    ("OMP_NUM_THREADS=1 python train_ladd.py --ema 2", "--ema"),
    ("torchrun --nproc_per_node=2 train_ladd.py --preset nope", "--preset"),
    ("python train_ladd.py --resume runs/x --no-such-option", "--no-such-option"),
    ("python train_ladd.py --seed S --out RUN --no-such-option", "--no-such-option"),
    ("python train_ladd.py ... --no-such-option", "--no-such-option"),
    ("python train_teacher.py --task paint", "--task"),
    ('python sample.py --ckpt $T --sampler nope --prompt "a # b"', "--sampler"),
    ("python sample.py --ckpt $T --init-image in.png --strength 2 --prompt x", "--strength"),
    ("python inpaint.py --ckpt $T --eval -3", "--eval"),
    ("python evaluate.py --ckpt $T --ckpt $T --steps 4 --steps 2 --steps 1", "--steps"),
    ("python text_encoders.py --ckpt x.safetensors --prompts p.txt --shard-size 0", "--shard-size"),
    ("python bench.py mmdit --config nope", "--config"),
    ("python tests/bench_diffusers.py --size 3x", "--size"),
    ("python exercises/exercises.py grade no-such-exercise", "no-such-exercise"),
    ("python lora.py --rank 4", "no options"),
    ("python no_such_script.py", "no no_such_script.py"),
    ("python train_ladd.py --steps 10 --seed S --out RUN", None),
    ("python train_ladd.py --resume runs/x --steps 3200", None),
    ("python train_teacher.py --preset quick --out runs/elsewhere", None),
    ('python sample.py --ckpt X --prompt "..." --device cuda', None),
    ("python evaluate.py --ckpt $T --ckpt runs/nowhere --steps 4 --steps 1 --n 8", None),
    ("python bench.py mmdit ... --compile", None),
    ("python exercises/exercises.py list", None),
]
PROSE = ("Refused in prose: `python evaluate.py --ckpt X --n\n1` and `python train_ladd.py --steps "
         "many`; accepted: `python bench.py\nmmdit --help`, and `not python x.py` is no command.")
PROSE_CASES = [("--n", 0), ("--steps", 1), (None, 1)]  # (refusal word, line within PROSE)


def test_a_doctored_command_is_refused(tmp_path, monkeypatch, capsys):
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    block = "\n".join(["```bash", "T=assets/shapes_teacher.safetensors"] + [c for c, _ in DOCTORED]
                      + ["pip install -r requirements.txt && python -m pytest  # no script", "```"])
    copy = readme if readme.endswith("\n") else readme + "\n"
    (tmp_path / "README.md").write_text(copy + "\n" + block + "\n\n" + PROSE + "\n", encoding="utf-8")
    first = copy.count("\n") + 4  # the line of DOCTORED's first command
    lines, line = [], first
    for text, _ in DOCTORED:
        lines.append(line)
        line += text.count("\n") + 1
    prose = line + 3
    found = [c for c in documented_commands(tmp_path) if c.path == "README.md" and c.line >= first]
    assert [c.line for c in found] == lines + [prose + k for _, k in PROSE_CASES], [c.where for c in found]
    assert found[0].argv == ["--steps", "10", "--no-such-option", "1"]  # joined, comment dropped
    assert found[7].argv == ["--ckpt", "assets/shapes_teacher.safetensors", "--sampler", "nope",
                             "--prompt", "a # b"]  # $T set in the block; a quoted # stays
    cases = [w for _, w in DOCTORED] + [w for w, _ in PROSE_CASES]
    for command, word in zip(found, cases):
        with monkeypatch.context() as m:
            why = refusal(command, m, tmp_path, capsys)
        if word is None:
            assert why is None, f"{command.where} {command.text}: {why}"
        else:
            assert why is not None and word in why, f"{command.where} {command.text}: {why}"
            assert "\x00" not in why, why
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert f.read() == readme, "the real README.md changed"


def test_a_wrong_line_count_is_caught(tmp_path):
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    rows = file_table_rows(readme)
    assert rows, NO_TABLE
    line, name, stated = rows[0]
    lines = readme.splitlines()
    wrong = str(line_count(os.path.join(ROOT, name)) + 1)
    lines[line - 1] = re.sub(r"(?<=\|)([\s*~]*)" + re.escape(stated) + r"(?=[\s*~]*\|)",
                             lambda m: m.group(1) + wrong, lines[line - 1], count=1)
    (tmp_path / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    problems = count_problems(_readme_rows(tmp_path))
    assert any(p.startswith(f"README.md:{line}: {name} has ") and f"says {wrong}" in p
               for p in problems), problems
    # a table with its columns in another order, and a README without one
    moved = "| lines | file |\n|---|---|\n| 1 | `no_such.py` |\n| 999999 | `cli.py` |\n"
    assert [p.split(": ", 1)[1] for p in count_problems(file_table_rows(moved))] == [
        "no_such.py states 1 lines, but there is no such file",
        f"cli.py has {line_count(os.path.join(ROOT, 'cli.py'))} lines, the table says 999999"]
    assert file_table_rows("# no table here\n\n| a | b |\n|---|---|\n| 1 | 2 |\n") == []

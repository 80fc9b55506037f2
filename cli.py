"""
What every script's command line shares: options generated from a config dataclass, presets and
`--resume`, prompts from files, the device and dtype chosen once, and user errors as one line.

A script declares its settings once, as a dataclass with a comment on every field:

    @dataclass
    class Config:
        steps: int = 1600     # student updates

and gets `--steps N` with that comment as its help. Unknown or abbreviated options, and any
ValueError / OSError raised while the script runs, end as one line `error: ...` with exit code 2
(no traceback: the message names the input and the fix).
"""

import argparse
import contextlib
import dataclasses
import difflib
import inspect
import json
import math
import os
import re
import signal
import sys
import tempfile
import threading

import torch

import weights

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
USER_ERRORS = (ValueError, OSError, NotImplementedError)  # reported as one line, no traceback


# ----------------------------------------------------------------------------------------------
# device and dtype, chosen once


def pick_device(name="auto"):
    """'auto': cuda, then mps, then cpu. Anything else must exist on this machine."""
    mps = getattr(torch.backends, "mps", None)
    has_mps = mps is not None and mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use auto or cpu")
    if device.type == "mps" and not has_mps:
        raise ValueError(f"--device {name}: MPS is not available on this machine; use auto or cpu")
    return device


def pick_dtype(name, device):
    """'auto': bf16 on CUDA, fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


# ----------------------------------------------------------------------------------------------
# options from a config dataclass


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage block
        self.exit(2, f"error: {message} (see --help)\n")


def _field_help(cls):
    """Field name -> its comment in the class source: the --help text."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.+)$", source, re.M))


def build_parser(cls, prog, doc, choices=None, item_types=None, given_only=False):
    """The argparse parser of the config dataclass `cls` (parse_config's)."""
    parser = Parser(prog=prog, description=" ".join(doc.split("\n\n")[0].split()),
                    allow_abbrev=False)
    helps, choices, item_types = _field_help(cls), choices or {}, item_types or {}
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        shown = "" if f.default is dataclasses.MISSING else f" (default: {f.default})"
        kw = {"help": (helps.get(f.name, "") + shown).replace("%", "%%")}  # argparse formats it
        if f.type is bool:
            kw.update(action="store_const", const=True, default=None if given_only else False)
        elif f.type is list:
            kw.update(action="append", default=None if given_only else [],
                      type=item_types.get(f.name, str), choices=choices.get(f.name))
        else:
            kw.update(type=f.type, choices=choices.get(f.name), required=required and not given_only,
                      default=None if given_only or required else f.default)
        parser.add_argument("--" + f.name.replace("_", "-"), **kw)
    return parser


def parse_config(cls, argv, prog, doc, choices=None, item_types=None, given_only=False):
    """argv -> an instance of the config dataclass `cls`: one --option per field, the field's
    comment as its help; list fields repeat (items of type item_types[name], default str).
    given_only: return only the options given, as a dict (a training script puts its preset,
    or a resumed run's saved config, under them: `resolve_config`)."""
    parser = build_parser(cls, prog, doc, choices, item_types, given_only)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = unknown[0].split("=")[0]
        if not flag.startswith("-"):
            hint = "; prompts go after --prompt" if "prompt" in vars(args) else ""
            parser.error(f"unexpected argument {flag!r}{hint}")
        options = [o for a in parser._actions for o in a.option_strings]
        close = difflib.get_close_matches(flag, options, n=1)
        parser.error(f"unknown option {flag}" + (f"; did you mean {close[0]}?" if close else ""))
    if given_only:
        return {k: v for k, v in vars(args).items() if v is not None}
    return cls(**vars(args))


def resolve_config(cls, presets, given, script, may_change=(), resume_needs=("state.safetensors",),
                   older_runs=None):
    """A training run's config: the options given, over the preset's, over the defaults. With
    --resume, the run's saved config.json instead, which the options given must equal except
    those in `may_change` (e.g. --steps): a resumed run is the run it was. A new run refuses a
    --out that already holds one, unless --overwrite. older_runs: {option: value} for options
    newer than some saved runs, the value that reproduces a run saved without them."""
    out = given.get("resume") or given.get("out") or cls(**presets[given.get("preset", "default")]).out
    files = held_run_files(out)
    if not given.get("resume"):
        if files and not given.get("overwrite"):
            raise ValueError(f"--out {out} holds a run ({', '.join(files)}); continue it with "
                             f"--resume {out}, or replace it with --overwrite")
        return cls(**{**presets[given.get("preset", "default")], **given})
    if given.get("overwrite"):
        raise ValueError("--resume continues a run and --overwrite replaces it; pass one of them")
    if given.get("out") not in (None, out):
        raise ValueError(f"--out {given['out']} and --resume {out} name different folders; "
                         f"--resume alone continues the run in its own folder")
    missing = [f for f in ("config.json", *resume_needs) if not os.path.isfile(os.path.join(out, f))]
    if missing:
        saved = ("it stopped before saving a state; start it again with --overwrite"
                 if "config.json" not in missing else f"pass a run folder made by {script}")
        raise ValueError(f"--resume {out}: no {' or '.join(missing)} there ({saved})")
    saved = {**(older_runs or {}), **saved_config(out)}
    check_maker(cls, saved, out, script)
    check_steps_ahead(given, saved, out)
    fixed = {k: v for k, v in given.items() if k not in (*may_change, "resume", "out")}
    differ = [f"--{k.replace('_', '-')} {v} (the run's: {saved.get(k)})"
              for k, v in fixed.items() if saved.get(k) != v]
    if differ:
        raise ValueError(f"--resume {out}: these options differ from the run's: {', '.join(differ)}; "
                         f"a resumed run keeps its settings, except "
                         f"{', '.join('--' + k.replace('_', '-') for k in may_change)}")
    return cls(**{**saved, **given, "out": out, "overwrite": False})


def saved_config(out):
    """A run folder's config.json -> its options (a dict), or a one-line error naming the file."""
    path = os.path.join(out, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"--resume {out}: {path} is not readable JSON ({e}); start the run "
                         f"again with --overwrite --out {out}") from None
    if not isinstance(saved, dict):
        raise ValueError(f"--resume {out}: {path} holds a JSON {type(saved).__name__}, not the "
                         f"run's options; start the run again with --overwrite --out {out}")
    return saved


def run_maker(out):
    """The script that made the run in `out` (from its model's metadata), or None."""
    try:
        command = weights.load_metadata(os.path.join(out, "model.safetensors")).get("command", "")
    except (OSError, ValueError):
        return None
    words = command.split()
    return os.path.basename(words[1]) if words[:1] == ["python"] and len(words) > 1 else None


def check_maker(cls, saved, out, script):
    """A saved config with options `cls` does not have is another script's run: say whose."""
    unknown = sorted(set(saved) - {f.name for f in dataclasses.fields(cls)})
    if not unknown:
        return
    maker = run_maker(out)
    if maker and maker != script:
        raise ValueError(f"--resume {out}: a run folder made by {maker}, not {script}; continue "
                         f"it with: python {maker} --resume {out}")
    raise ValueError(f"--resume {out}: its config.json has options {script} does not know "
                     f"({', '.join(unknown[:4])}); pass a run folder made by {script}")


def saved_step(out):
    """The step a run's state.safetensors was saved at (read from its header), or None."""
    path = os.path.join(out, "state.safetensors")
    try:
        return json.loads(weights.load_metadata(path)["tree"])["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_steps_ahead(given, saved, out):
    """A resumed run continues forwards: --steps below the steps already done is an error."""
    steps, done = given.get("steps"), saved_step(out)
    if steps is not None and done is not None and steps < done:
        raise ValueError(f"--steps {steps}: the run in {out} is already at step {done}; pass "
                         f"--steps {done} or more, or leave --steps out")


def held_run_files(folder):
    """The files of a training run that `folder` holds (none: a new or empty folder)."""
    names = ("config.json", "log.jsonl", "state.safetensors", "model.safetensors")
    return [n for n in names if os.path.isfile(os.path.join(folder, n))]


# option values: (test, what is allowed), for check_options
FINITE = (math.isfinite, "a finite number")
POSITIVE = (lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
NON_NEGATIVE = (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
COUNT = (lambda v: v >= 0, "an integer >= 0")
AT_LEAST_1 = (lambda v: v >= 1, "an integer >= 1")
DECAY = (lambda v: 0 <= v < 1, "a number in [0, 1)")
SHARE = (lambda v: 0 <= v <= 1, "a number in [0, 1]")
SEED = (lambda v: 0 <= v < 2 ** 63, "an integer in [0, 2**63)")


def check_options(cfg, rules):
    """rules: {field: (test, what is allowed)}; the first value that fails its test is a
    one-line error naming the option and what it allows."""
    for name, (ok, allowed) in rules.items():
        value = getattr(cfg, name)
        if not ok(value):
            raise ValueError(f"--{name.replace('_', '-')} {value}: want {allowed}")


def parse_list(text, name, kind=float):
    """'1,0.75,0.5' -> [1.0, 0.75, 0.5] for option --name, or a one-line error."""
    try:
        return [kind(v) for v in str(text).split(",")]
    except ValueError:
        raise ValueError(f"--{name} {text!r}: want comma-separated numbers, e.g. 1,0.75,0.5,0.25") from None


def training_main(cls, presets, train, argv, prog, doc, **resume_rules):
    """A training script's main: the options given, over the --preset's (or, with --resume, the
    run's saved config), over the defaults of `cls` -> train(config). resume_rules: may_change,
    resume_needs (resolve_config)."""
    def run(given):
        with terminate_as_interrupt():  # SIGTERM (schedulers, `timeout`) saves like Ctrl-C
            return train(resolve_config(cls, presets, given, prog, **resume_rules))
    return run_cli(lambda a: parse_config(cls, a, prog, doc, {"preset": tuple(presets)},
                                          given_only=True), run, argv)


@contextlib.contextmanager
def terminate_as_interrupt():
    """Within: SIGTERM raises KeyboardInterrupt, as Ctrl-C does, so a training run stopped by a
    scheduler or `timeout` saves its state (training.finish_step_on_interrupt takes both signals
    over inside the loop). The previous handler is restored after."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main one
        yield
        return

    def handle(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def read_prompts(items, option="--prompt"):
    """--prompt values -> prompts; a value ending in .txt is a file with one prompt per line
    (UTF-8, with or without the byte-order mark some editors put at its start)."""
    prompts = []
    for item in items:
        if not item.endswith(".txt"):
            prompts.append(item)
            continue
        try:
            with open(item, encoding="utf-8-sig") as f:
                prompts += [line.strip() for line in f if line.strip()]
        except OSError as e:
            raise ValueError(f"{option} {item}: cannot read the prompt file ({e.strerror})") from None
        except UnicodeDecodeError:
            raise ValueError(f"{option} {item}: cannot read it as text (not UTF-8); a prompt "
                             "file must be UTF-8 text, one prompt a line") from None
    return prompts


def check_out_folder(folder, option="--out"):
    """Fail before any work when `folder` cannot take a script's output: make it (with any missing
    parents), create and remove a file in it, then remove the folders made here again."""
    made, path = [], os.path.abspath(folder)
    while not os.path.lexists(path):
        made.append(path)
        path = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        os.close(fd)
        os.remove(tmp)
    except OSError as e:
        raise ValueError(f"{option} {folder}: cannot write there ({e.strerror or e}); pass a "
                         "writable folder") from None
    finally:
        for path in made:  # deepest first
            try:
                os.rmdir(path)
            except OSError:
                pass


# ----------------------------------------------------------------------------------------------
# running a script


def one_line(message):
    """A multi-line error message -> one line (list items joined by '; ')."""
    message = re.sub(r":\s*\n\s*", ": ", str(message).strip())
    return re.sub(r"\s*\n\s*", "; ", message)


def run_cli(parse, run, argv=None):
    """A script's main: parse (a bad option exits 2 with one line), run, and report a problem
    with the user's input as one line `error: ...` with exit code 2; Ctrl-C ends with code 130
    and one line (a training run saves its state first and says how to continue)."""
    config = parse(argv)
    try:
        return run(config)
    except USER_ERRORS as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt as e:
        print(f"interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        raise SystemExit(130) from None

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
import dataclasses
import difflib
import inspect
import json
import os
import re
import sys

import torch

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


def parse_config(cls, argv, prog, doc, choices=None, item_types=None, given_only=False):
    """argv -> an instance of the config dataclass `cls`: one --option per field, the field's
    comment as its help; list fields repeat (items of type item_types[name], default str).
    given_only: return only the options given, as a dict (a training script puts its preset,
    or a resumed run's saved config, under them: `resolve_config`)."""
    parser = Parser(prog=prog, description=" ".join(doc.split("\n\n")[0].split()),
                    allow_abbrev=False)
    helps, choices, item_types = _field_help(cls), choices or {}, item_types or {}
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        shown = "" if f.default is dataclasses.MISSING else f" (default: {f.default})"
        kw = {"help": helps.get(f.name, "") + shown}
        if f.type is bool:
            kw.update(action="store_const", const=True, default=None if given_only else False)
        elif f.type is list:
            kw.update(action="append", default=None if given_only else [],
                      type=item_types.get(f.name, str), choices=choices.get(f.name))
        else:
            kw.update(type=f.type, choices=choices.get(f.name), required=required and not given_only,
                      default=None if given_only or required else f.default)
        parser.add_argument("--" + f.name.replace("_", "-"), **kw)
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


def resolve_config(cls, presets, given, script):
    """A training run's config: the options given, over the preset's, over the defaults; with
    --resume, over the run's saved config.json instead of a preset."""
    if given.get("resume"):
        path = os.path.join(given["resume"], "config.json")
        if not os.path.isfile(path):
            raise ValueError(f"--resume {given['resume']}: no config.json there; pass a run folder "
                             f"made by {script}")
        with open(path) as f:
            return cls(**{**json.load(f), **given, "out": given["resume"]})
    return cls(**{**presets[given.get("preset", "default")], **given})


def parse_list(text, name, kind=float):
    """'1,0.75,0.5' -> [1.0, 0.75, 0.5] for option --name, or a one-line error."""
    try:
        return [kind(v) for v in str(text).split(",")]
    except ValueError:
        raise ValueError(f"--{name} {text!r}: want comma-separated numbers, e.g. 1,0.75,0.5,0.25") from None


def training_main(cls, presets, train, argv, prog, doc):
    """A training script's main: the options given, over the --preset's (or, with --resume, the
    run's saved config), over the defaults of `cls` -> train(config)."""
    return run_cli(lambda a: parse_config(cls, a, prog, doc, {"preset": tuple(presets)},
                                          given_only=True),
                   lambda given: train(resolve_config(cls, presets, given, prog)), argv)


def read_prompts(items):
    """--prompt values -> prompts; a value ending in .txt is a file with one prompt per line."""
    prompts = []
    for item in items:
        if not item.endswith(".txt"):
            prompts.append(item)
            continue
        try:
            with open(item, encoding="utf-8") as f:
                prompts += [line.strip() for line in f if line.strip()]
        except OSError as e:
            raise ValueError(f"--prompt {item}: cannot read the prompt file ({e.strerror})") from None
    return prompts


# ----------------------------------------------------------------------------------------------
# running a script


def one_line(message):
    """A multi-line error message -> one line (list items joined by '; ')."""
    message = re.sub(r":\s*\n\s*", ": ", str(message).strip())
    return re.sub(r"\s*\n\s*", "; ", message)


def run_cli(parse, run, argv=None):
    """A script's main: parse (a bad option exits 2 with one line), run, and report a problem
    with the user's input as one line `error: ...` with exit code 2."""
    config = parse(argv)
    try:
        return run(config)
    except USER_ERRORS as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        raise SystemExit(2) from None

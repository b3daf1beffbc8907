"""The options several subcommands share, spelled, checked and read one way.

- `--dtype NAME`: names from `gptoss_verify.dtypes.DTYPES` (torch's spelling: `bfloat16`).
- `--device cpu|cuda[:N]`: checked when parsed, so asking for CUDA where there is none is a usage
  error (exit 2), not a failed check.
- `--report PATH` writes the markdown report; `--json PATH` writes the same results as JSON
  (`-` prints them on stdout). Both are written atomically (temp name, then rename).
- `--preset NAME | --config PATH | --checkpoint DIR` and `--layers N`: the model to build; a
  config file is HF's or OpenAI's `config.json`, told apart by its keys.
- Layouts: an option naming a checkpoint layout says which way it goes: `--to LAYOUT` (the layout
  a command writes), `--via LAYOUT` (the one a round trip passes through and comes back from),
  `--from LAYOUT` (the one a reader assumes instead of detecting it).
- `--tp/--ep/--pp/--pad-vocab`: the Megatron grid of a conversion.

A bad value that argparse can see is a usage error (exit 2); a bad file raises one of the
project's `ValueError`s naming the file (exit 1; `gptoss_verify/cli.py` maps them).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from ..config import PRESETS, ConfigError, ModelSpec, preset
from ..dtypes import DTYPES
from ..formats.layout import LAYOUTS


# ---- plain values -----------------------------------------------------------------------------
def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (anything else is a usage error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


# ---- dtype, device ----------------------------------------------------------------------------
def add_dtype(p: argparse.ArgumentParser, *, choices=tuple(DTYPES), default: str | None = None,
              repeatable: bool = False, help: str | None = None) -> None:
    """`--dtype NAME`; read the value with `DTYPES[name]`."""
    assert all(c in DTYPES for c in choices)
    p.add_argument("--dtype", choices=list(choices), default=default, action="append" if repeatable else "store",
                   help=help or (f"default {default}" if default else None))


def device(text: str) -> str:
    """argparse type: `cpu`, `cuda` or `cuda:N`, CUDA only where a CUDA device is available."""
    if text != "cpu" and not (text == "cuda" or text.startswith("cuda:")):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if text.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text} asked for, but no CUDA device is available")
    return text


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=device, default="cpu", help="cpu or cuda (default cpu)")


# ---- outputs ----------------------------------------------------------------------------------
def add_report(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("--report", metavar="PATH",
                   help="write the markdown report here" + (f" (default: {default})" if default else ""))


def add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON here (- for stdout)")


def write_report(path: str | Path | None, text: str) -> None:
    if path is not None:
        from ..report import write_atomic
        write_atomic(path, text)


def write_json(path: str | Path | None, data) -> None:
    """Write `data` (dicts, lists, dataclasses; anything else as its `str`) as JSON to `path`."""
    if path is None:
        return
    text = json.dumps(plain(data), indent=1, default=str) + "\n"
    if str(path) == "-":
        sys.stdout.write(text)
    else:
        from ..report import write_atomic
        write_atomic(path, text)


def plain(data):
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        return {f.name: plain(getattr(data, f.name)) for f in dataclasses.fields(data)}
    if isinstance(data, dict):
        return {str(k): plain(v) for k, v in data.items()}
    if isinstance(data, (list, tuple, set)):
        return [plain(v) for v in data]
    return data


# ---- the model: preset, config file or checkpoint ---------------------------------------------
def add_model_source(p: argparse.ArgumentParser, *, checkpoint: bool = False, default: str = "tiny") -> None:
    """`--preset | --config [| --checkpoint]` (one of them) and `--layers N`."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=sorted(PRESETS), default=default,
                     help=f"architecture preset (default: {default})")
    src.add_argument("--config", metavar="PATH", type=Path, help="an HF or OpenAI-original config.json")
    if checkpoint:
        src.add_argument("--checkpoint", metavar="DIR", type=Path,
                         help="use the weights of a checkpoint on disk (any layout)")
    p.add_argument("--layers", type=positive_int, help="keep only the first N layers (at full width)")


def load_config(path: str | Path) -> ModelSpec:
    """An HF or OpenAI-original `config.json` (OpenAI's has `num_experts` and no `model_type`); a
    bad file is a `ConfigError` naming it. The spec is named after the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: cannot read config ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    openai = "num_experts" in data and "model_type" not in data and "num_local_experts" not in data
    try:
        return (ModelSpec.from_openai_config if openai else ModelSpec.from_hf_config)(data, name=path.stem)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def spec_from_args(args: argparse.Namespace) -> ModelSpec:
    """The spec of `--preset`/`--config` (not `--checkpoint`), cut to `--layers`."""
    spec = load_config(args.config) if args.config is not None else preset(args.preset)
    return spec.with_layers(args.layers) if args.layers else spec


def load_checkpoint(path: str | Path, layers: int | None = None) -> tuple[ModelSpec, dict]:
    """Any layout on disk as dense canonical tensors (MXFP4 experts decoded, exactly, to bf16),
    cut to the first `layers` layers."""
    from ..formats import layout
    from ..formats.canonical import to_dense
    spec, stream = layout.module(layout.detect(path)).read(path)
    state = dict(to_dense(stream))
    if layers:
        state = {n: t for n, t in state.items()
                 if not (n.startswith("model.layers.") and int(n.split(".")[2]) >= layers)}
        spec = spec.with_layers(layers)
    return spec, state


# ---- layouts, Megatron grid -------------------------------------------------------------------
def add_layout(p: argparse.ArgumentParser, direction: str, *, required: bool = False,
               choices=None, default: str | None = None, help: str | None = None) -> None:
    """`--to`, `--via` or `--from LAYOUT` (see the module docstring for which is which)."""
    assert direction in ("to", "via", "from")
    p.add_argument(f"--{direction}", dest=f"{direction}_layout", metavar="LAYOUT", required=required,
                   choices=sorted(choices or LAYOUTS), default=default,
                   help=(help or "") + f" ({' | '.join(sorted(choices or LAYOUTS))}"
                        + (f"; default {default})" if default else ")"))


def add_parallel(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size (Megatron targets)")
    p.add_argument("--ep", type=int, default=1, help="expert parallel size (Megatron targets)")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size (Megatron targets)")
    p.add_argument("--pad-vocab", action="store_true", help="pad the vocabulary as Megatron-LM does")

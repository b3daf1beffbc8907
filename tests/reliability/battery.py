"""The generated bad-input battery (issue 18 item 4): what is mutated, how, and what counts as a
clean end.

A `Target` is one kind of file we read, inside a small valid input: the safetensors shards,
index and config of an HF checkpoint, the config and shard of an OpenAI one, a Megatron rank file,
sidecar and tracker, the torch_dist `.metadata`, `.distcp` and `metadata.json`, an engine's dump and
an exported case (manifest, inputs), and the second checkpoint of `diff A B`. Hypothesis draws a mutation for its kind
(`mutations`): JSON edits (types, ranges, missing and extra fields), header edits (dtypes, shapes,
offsets, the length field), truncation, byte flips, zip-directory damage, pickles with globals.
Each mutated checkpoint is read by the command in a forked child (`run_clean`) under a time bound
and an address-space bound, with every write call watched.

A reader of a new format adds a `Target` to `TARGETS` (a pristine input, the files to mutate with
their kinds, the command that reads it, and how an accepted input is checked); the test, the
figures and the thorough profile pick it up unchanged.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import resource
import shutil
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

from hypothesis import strategies as st

from gptoss_verify.cli import main

from .faults import Faults, run_forked

#: what a forbidden global would create if it ran (one per test process: xdist workers run side by side)
MARKER = Path(f"/tmp/gptoss-battery-pwned-{os.getpid()}")
TIME_BOUND_S = 30.0  # per input: a tiny checkpoint reads in well under a second
MEMORY_HEADROOM = 1 << 30  # address space allowed beyond the child's at fork, plus 32x the input size


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    layout: str  # the pristine checkpoint it lives in (a key of the `pristine` fixture)
    files: tuple[tuple[str, str], ...]  # (glob inside the checkpoint, mutation kind)
    command: Callable  # (src, dst, pristine) -> CLI arguments, or a call returning the exit code
    oracle: str  # how an accepted input is checked: "raw" tensors equal, "valid" output, "dump", "diff"


def _convert_to(layout: str, *extra):
    return lambda src, dst, pristine: ["convert", src, dst, "--to", layout, *extra]


def _judge_dump(src: Path, dst: Path, pristine) -> Callable[[], int]:
    """Read an exported case and an engine's dump and judge it, as `gptoss-verify judge` does (a
    FAIL verdict is an answer, not a refusal, so the call reports it as exit 0 with the verdict in
    `dst`); errors as the CLI prints them."""
    def call() -> int:
        import sys

        from gptoss_verify.cli import INPUT_ERRORS
        from gptoss_verify.subjects.dump import judge_dump
        try:
            verdict = judge_dump(src / "case", src / "dump.safetensors")
        except INPUT_ERRORS as err:
            print(f"gptoss-verify case: error: {err}", file=sys.stderr)
            return 1
        dst.write_text(json.dumps({"passed": verdict.passed, "cells": [c.name for c in verdict.cells]}))
        return 0
    return call


def _diff_against_pristine(src: Path, dst: Path, pristine) -> list:
    return ["diff", pristine["hf"], src, "--json", dst, "--tokens", 4]


TARGETS = {t.name: t for t in [
    Target("hf-safetensors", "hf", (("*.safetensors", "safetensors"),), _convert_to("hf"), "raw"),
    Target("hf-index", "hf", (("model.safetensors.index.json", "json"),), _convert_to("hf"), "raw"),
    Target("hf-config", "hf", (("config.json", "config"),), _convert_to("hf"), "raw"),
    Target("openai-safetensors", "openai", (("model.safetensors", "safetensors"),), _convert_to("openai"), "raw"),
    Target("openai-config", "openai", (("config.json", "config"), ("dtypes.json", "json")), _convert_to("openai"), "raw"),
    Target("megatron-rank-file", "megatron", (("iter_*/mp_rank_*/model_optim_rng.pt", "torchzip"),),
           _convert_to("hf"), "valid"),
    Target("megatron-sidecar", "megatron", (("gptoss_verify_megatron.json", "config"),
                                            ("latest_checkpointed_iteration.txt", "bytes")), _convert_to("hf"), "valid"),
    Target("torch_dist-metadata", "megatron-dist", (("iter_*/.metadata", "pickle"), ("iter_*/__0_0.distcp", "bytes")),
           _convert_to("hf"), "valid"),
    Target("torch_dist-json", "megatron-dist", (("iter_*/metadata.json", "json"), ("gptoss_verify_megatron.json", "config")),
           _convert_to("hf"), "valid"),
    Target("engine-dump", "case", (("dump.safetensors", "safetensors"),), _judge_dump, "dump"),
    Target("case-manifest", "case", (("case/manifest.json", "config"), ("case/inputs.safetensors", "safetensors")),
           _judge_dump, "case"),
    Target("diff-second-checkpoint", "hf", (("*.safetensors", "safetensors"), ("config.json", "config"),
                                            ("model.safetensors.index.json", "json")), _diff_against_pristine, "diff"),
]}


# ---- mutations -------------------------------------------------------------------------------
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64) | st.sampled_from([0, -1, 1, 2**31, 2**62, 10**30])
    | st.floats(allow_nan=True) | st.text(max_size=8) | st.sampled_from(["BF16", "F8_E4M3", "U8", "bfloat16", ""]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)

#: globals a rank file's pickle must never get to call (weights_only refuses them)
EVIL_GLOBALS = [("os", "system"), ("posix", "system"), ("builtins", "exec"), ("builtins", "eval"),
                ("subprocess", "Popen"), ("builtins", "getattr"), ("shutil", "rmtree"), ("io", "open")]


def _paths(obj, prefix=()):
    """Every path (tuple of keys/indices) into a JSON value, the root included."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def json_edit(draw, obj):
    """Replace, delete or add one value anywhere in `obj` (a JSON document)."""
    paths = list(_paths(obj))
    path = draw(st.sampled_from(paths))
    op = draw(st.sampled_from(["replace", "delete", "add"] if path else ["replace", "add"]))
    if not path and op == "replace":
        return draw(JSON_VALUES)
    if op == "add":
        parent_path = path if isinstance(_get(obj, path), (dict, list)) else path[:-1]
        parent = _get(obj, parent_path)
        if isinstance(parent, dict):
            parent[draw(st.text(max_size=10) | st.sampled_from(sorted(parent) or ["x"]))] = draw(JSON_VALUES)
        elif isinstance(parent, list):
            parent.insert(draw(st.integers(0, len(parent))), draw(JSON_VALUES))
        return obj
    parent, key = _get(obj, path[:-1]), path[-1]
    if op == "delete":
        del parent[key]
    else:
        parent[key] = draw(JSON_VALUES)
    return obj


def _get(obj, path):
    for k in path:
        obj = obj[k]
    return obj


def flips(draw, data: bytes, lo: int = 0, hi: int | None = None) -> bytes:
    hi = len(data) if hi is None else hi
    if hi <= lo:
        return data
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(lo, hi - 1))
        out[i] = draw(st.integers(0, 255).filter(lambda b, old=out[i]: b != old))
    return bytes(out)


def truncate(draw, data: bytes) -> bytes:
    return data[: draw(st.integers(0, max(len(data) - 1, 0)))]


def mutate_bytes(draw, data: bytes) -> tuple[str, bytes]:
    how = draw(st.sampled_from(["truncate", "flip", "append", "empty"]))
    if how == "truncate":
        return how, truncate(draw, data)
    if how == "append":
        return how, data + draw(st.binary(min_size=1, max_size=64))
    if how == "empty":
        return how, b""
    return how, flips(draw, data)


def mutate_json(draw, data: bytes) -> tuple[str, bytes]:
    if draw(st.integers(0, 4)) == 0:
        return mutate_bytes(draw, data)
    return "json edit", json.dumps(json_edit(draw, json.loads(data)), allow_nan=True).encode()


def mutate_config(draw, data: bytes) -> tuple[str, bytes]:
    """JSON edits, weighted to the fields a config lives by (counts, sizes, layer types)."""
    cfg = json.loads(data)
    if draw(st.booleans()) and isinstance(cfg, dict) and cfg:
        key = draw(st.sampled_from(sorted(cfg)))
        how = draw(st.sampled_from(["type", "range", "missing", "layer types"]))
        if how == "missing":
            del cfg[key]
        elif how == "layer types" and "layer_types" in cfg:
            lt = cfg["layer_types"]
            cfg["layer_types"] = draw(st.sampled_from([lt[:-1], lt + ["full_attention"], ["sliding_attention"] * len(lt),
                                                       ["bogus"] * len(lt), "full_attention"]))
        elif how == "range":
            cfg[key] = draw(st.sampled_from([0, -1, -2**31, 2**40, 1.5, float("inf")]))
        else:
            cfg[key] = draw(st.sampled_from(["64", None, [], {}, True, 3.0]))
        return f"config {how} {key}", json.dumps(cfg, allow_nan=True).encode()
    return mutate_json(draw, data)


def mutate_safetensors(draw, data: bytes) -> tuple[str, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    how = draw(st.sampled_from(["header json", "length field", "truncate", "flip header", "flip data"]))
    if how == "header json":
        header = json.loads(data[8:8 + n])
        raw = json.dumps(json_edit(draw, header), allow_nan=True).encode()
        raw += b" " * (-len(raw) % 8)
        return how, struct.pack("<Q", len(raw)) + raw + data[8 + n:]
    if how == "length field":
        value = draw(st.sampled_from([0, 1, n - 1, n + 1, len(data), 2**63, 2**64 - 1, 100 * 2**20 + 1])
                     | st.integers(0, 2**64 - 1))
        return how, struct.pack("<Q", value) + data[8:]
    if how == "truncate":
        return how, truncate(draw, data)
    if how == "flip header":
        return how, flips(draw, data, 0, 8 + n)
    return how, flips(draw, data, 8 + n)


def evil_pickle(draw) -> tuple[bytes, str]:
    """A protocol-2 pickle that calls a forbidden global (weights_only must refuse it), and the
    file it would create if it ran."""
    module, name = draw(st.sampled_from(EVIL_GLOBALS))
    marker = str(MARKER)
    arg = f"touch {marker}" if name in ("system", "Popen") else f"open({marker!r}, 'w')"
    return (b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n(X" + struct.pack("<I", len(arg))
            + arg.encode() + b"tR}q\x00."), marker


def mutate_torchzip(draw, data: bytes) -> tuple[str, bytes]:
    how = draw(st.sampled_from(["evil pickle", "pickle bytes", "zip directory", "record data", "truncate",
                                "crc", "local header"]))
    zf = zipfile.ZipFile(io.BytesIO(data))
    infos = zf.infolist()
    if how in ("evil pickle", "pickle bytes"):
        pkl_info = next(i for i in infos if i.filename.endswith("/data.pkl"))
        pkl = zf.read(pkl_info)
        new = evil_pickle(draw)[0] if how == "evil pickle" else flips(draw, pkl)
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as w:
            for info in infos:
                w.writestr(info, new if info is pkl_info else zf.read(info))
        return how, out.getvalue()
    if how == "zip directory":  # the central directory and the end records
        return how, flips(draw, data, zf.start_dir)
    if how == "record data":
        big = max(infos, key=lambda i: i.file_size)
        begin = big.header_offset + 30 + len(big.filename) + len(big.extra)
        return how, flips(draw, data, begin, begin + big.file_size)
    if how == "crc":  # one central directory entry's CRC field
        at = data.find(b"PK\x01\x02", zf.start_dir) + 16
        return how, data[:at] + struct.pack("<I", draw(st.integers(0, 2**32 - 1))) + data[at + 4:]
    if how == "local header":
        info = draw(st.sampled_from(infos))
        return how, flips(draw, data, info.header_offset, info.header_offset + 30)
    return how, truncate(draw, data)


def mutate_pickle(draw, data: bytes) -> tuple[str, bytes]:
    how = draw(st.sampled_from(["evil pickle", "flip", "truncate", "evil prefix"]))
    if how == "evil pickle":
        return how, evil_pickle(draw)[0]
    if how == "evil prefix":
        return how, evil_pickle(draw)[0][:-1] + b"0" + data[2:]
    if how == "flip":
        return how, flips(draw, data)
    return how, truncate(draw, data)


MUTATIONS = {"safetensors": mutate_safetensors, "json": mutate_json, "config": mutate_config,
             "torchzip": mutate_torchzip, "pickle": mutate_pickle, "bytes": mutate_bytes}


@st.composite
def mutated(draw, target: Target, src: Path):
    """Mutate one file of `src` (a fresh copy of the target's checkpoint) in place; returns
    (relative file name, how)."""
    choices = sorted(str(p.relative_to(src)) for pattern, _ in target.files for p in src.glob(pattern))
    rel = draw(st.sampled_from(choices))
    kind = next(k for pattern, k in target.files if (src / rel) in set(src.glob(pattern)))
    how, data = MUTATIONS[kind](draw, (src / rel).read_bytes())
    (src / rel).write_bytes(data)
    return rel, f"{kind}: {how}"


# ---- running one input ------------------------------------------------------------------------
def _limit_memory(input_bytes: int) -> None:
    with open("/proc/self/statm") as f:
        vsz = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = vsz + MEMORY_HEADROOM + 32 * input_bytes
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))


def run_clean(argv: list | Callable[[], int], src: Path, work: Path) -> tuple[int, str, list]:
    """Run the CLI (or a call) on a (mutated) input in a forked child, bounded in time and address
    space; every write call under `src` is recorded. Returns (exit code, stderr, writes under src)."""
    size = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    log = work / "events.json"
    faults = Faults(src)

    def child():
        _limit_memory(size)
        return argv() if callable(argv) else main([str(a) for a in argv])

    code = run_forked(child, faults, log, timeout=TIME_BOUND_S)
    err = Path(str(log) + ".stderr").read_text(errors="replace")
    writes = [e for e in json.loads(log.read_text()) if e[0] != "read"]
    return code, err, writes


def fresh_copy(pristine: Path, work: Path) -> Path:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    shutil.copytree(pristine, work / "src")
    return work / "src"

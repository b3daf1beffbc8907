"""Golden logits: the oracle's outputs on a fixed set of cases, stored small, so that drift on either
side is caught: our model against them without transformers installed, and a new transformers
release against them with a report of which points moved and by how much.

Weights are not stored: each case names (spec, seed, profile) and `weights.random_weights`
rebuilds them exactly. Each case file holds the token ids, the logits (whole: toy vocabularies)
and one summary row per trace point (mean, rms, max |x|, float64 sum); `manifest.json` holds the
versions, each case's parameters and each file's sha256. Writing twice gives identical bytes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from . import judge, metrics
from .backends import block_functions
from .config import TINY_VARIANTS, ModelSpec
from .dtypes import DTYPES
from .formats.fileio.partials import open_output, scratch_directory, write_file
from .model import Transformer
from .dtypes import dtype_name
from .trace import Trace
from .weights import random_weights

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "golden"
SHAPES = TINY_VARIANTS


@dataclasses.dataclass(frozen=True)
class GoldenCase:
    shape: str
    dtype: str
    profile: str = "typical"
    seed: int = 0
    batch: int = 2
    seq: int = 40
    offset: int = 0
    decode_from: int | None = None  # ours is checked by prefilling this many tokens, then decoding one by one

    @property
    def name(self) -> str:
        extra = f"-off{self.offset}" if self.offset else ""
        extra += f"-decode{self.decode_from}" if self.decode_from is not None else ""
        return f"{self.shape}-{self.profile}-s{self.seed}-b{self.batch}x{self.seq}{extra}-{self.dtype}"

    @property
    def spec(self) -> ModelSpec:
        return SHAPES[self.shape]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def tokens(self) -> torch.Tensor:
        gen = torch.Generator().manual_seed(1000 + self.seed)
        return torch.randint(0, self.spec.vocab_size, (self.batch, self.seq), generator=gen)


CASES = [GoldenCase(shape, dtype, profile, seed, batch, seq, offset, decode)
         for dtype in ("float32", "bfloat16")
         for shape, profile, seed, batch, seq, offset, decode in [
             ("tiny", "typical", 0, 2, 40, 0, None),
             ("tiny", "stress", 1, 2, 40, 0, None),
             ("tiny", "typical", 2, 3, 17, 4090, None),        # positions past 4096
             ("tiny", "typical", 3, 1, 36, 0, 20),             # KV-cache decode after a 20-token prefill
             ("square", "typical", 4, 2, 33, 0, None),
             ("mha", "stress", 5, 1, 25, 100, None),
         ]]


def summaries(trace: Trace) -> tuple[list[str], torch.Tensor]:
    """(names, [n, 4] float64: mean, rms, max |x|, sum) of every floating trace point."""
    names, rows = [], []
    for name in trace.names():
        t = trace[name]
        if not t.is_floating_point():
            continue
        x = t.double()
        names.append(name)
        rows.append(torch.stack([x.mean(), x.pow(2).mean().sqrt(), x.abs().max(), x.sum()]))
    return names, torch.stack(rows)


def _oracle_outputs(case: GoldenCase) -> tuple[torch.Tensor, Trace]:
    from .oracles.hf import HFOracle  # only here: checking ours never imports transformers
    state = random_weights(case.spec, case.seed, case.profile, case.torch_dtype)
    trace = Trace()
    with torch.no_grad():
        logits = HFOracle(case.spec, state)(case.tokens(), case.offset, trace)
    return logits, trace


def _our_outputs(case: GoldenCase, faults: tuple[str, ...] = ()) -> tuple[torch.Tensor, Trace]:
    state = random_weights(case.spec, case.seed, case.profile, case.torch_dtype)
    model = Transformer.from_state_dict(case.spec, state, block_functions("reference", faults))
    ids, trace = case.tokens(), Trace()
    with torch.no_grad():
        if case.decode_from is None:
            return model(ids, case.offset, trace=trace), trace
        cache = model.new_cache()
        parts = [model(ids[:, :case.decode_from], case.offset, cache)]
        for p in range(case.decode_from, case.seq):
            parts.append(model(ids[:, p:p + 1], case.offset + p, cache))
        model(ids, case.offset, trace=trace)  # the trace summaries come from the full forward
        return torch.cat(parts, dim=1), trace


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def regenerate(out_dir: str | Path = DEFAULT_DIR, cases: list[GoldenCase] = CASES) -> Path:
    """Run the oracle on every case and write the goldens (into a temporary folder, then moved).
    One CPU thread, so the bits do not depend on the machine's core count."""
    import transformers
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _regenerate(Path(out_dir), cases, transformers.__version__)
    finally:
        torch.set_num_threads(threads)


def _regenerate(out_dir: Path, cases: list[GoldenCase], transformers_version: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = {"transformers": transformers_version, "torch": torch.__version__.split("+")[0],
                "python": platform.python_version(), "cases": {}}
    with scratch_directory(out_dir, "golden") as tmp:  # owned: a killed run's is swept by the next
        for case in cases:
            logits, trace = _oracle_outputs(case)
            names, table = summaries(trace)
            path = Path(tmp) / f"{case.name}.safetensors"
            data = save({"input_ids": case.tokens(), "logits": logits.float().contiguous(), "summaries": table},
                        metadata={"points": json.dumps(names)})
            with open_output(path) as f:  # our own write call: its errors name the file
                f.write(data)
            manifest["cases"][case.name] = {**dataclasses.asdict(case), "file": path.name, "sha256": _sha256(path)}
            print(f"golden {case.name}", flush=True)
        for case in cases:
            (Path(tmp) / f"{case.name}.safetensors").replace(out_dir / f"{case.name}.safetensors")
    write_file(out_dir / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return out_dir


@dataclasses.dataclass
class Drift:
    case: str
    side: str
    passed: bool
    measure: str
    moved: list[tuple[str, float]]  # trace points whose rms moved, largest first


class GoldenError(ValueError):
    pass


def load_manifest(golden_dir: str | Path) -> dict:
    path = Path(golden_dir) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise GoldenError(f"{path}: no golden manifest (run `gptoss-verify golden regenerate`)") from None
    except (OSError, ValueError) as err:
        raise GoldenError(f"{path}: cannot read the golden manifest ({err})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("cases"), dict):
        raise GoldenError(f"{path}: expected a JSON object with a 'cases' object")
    for name, entry in manifest["cases"].items():
        file = Path(golden_dir) / entry["file"]
        if not file.exists():
            raise GoldenError(f"{file}: named by the manifest for case {name}, missing")
        if _sha256(file) != entry["sha256"]:
            raise GoldenError(f"{file}: sha256 {_sha256(file)[:12]}… differs from the manifest's "
                              f"{entry['sha256'][:12]}… (edited or corrupted)")
    return manifest


def check(golden_dir: str | Path = DEFAULT_DIR, side: str = "ours", faults: tuple[str, ...] = ()) -> list[Drift]:
    """Compare `side` (ours | oracle) with every golden case; `faults` (bug-zoo names) are
    injected into ours, to show that the check sees them."""
    manifest = load_manifest(golden_dir)
    results = []
    for name, entry in manifest["cases"].items():
        params = {k: v for k, v in entry.items() if k not in ("file", "sha256")}
        case = GoldenCase(**params)
        stored = load_file(str(Path(golden_dir) / entry["file"]))
        from safetensors import safe_open
        with safe_open(str(Path(golden_dir) / entry["file"]), "pt") as f:
            points = json.loads(f.metadata()["points"])
        logits, trace = _our_outputs(case, faults) if side == "ours" else _oracle_outputs(case)
        results.append(_judge(case, side, stored, points, logits, trace))
    return results


def _judge(case: GoldenCase, side: str, stored: dict, points: list[str], logits: torch.Tensor,
           trace: Trace) -> Drift:
    golden = stored["logits"].double()
    names, table = summaries(trace)
    now = dict(zip(names, table[:, 1].tolist()))
    before = dict(zip(points, stored["summaries"][:, 1].tolist()))
    moved = sorted(((n, abs(now[n] - before[n]) / max(abs(before[n]), 1e-30)) for n in points if n in now),
                   key=lambda x: -x[1])[:5]
    exact = side == "oracle" or case.dtype == "float32"
    if exact:  # the oracle against itself; or float32, where ours and the oracle agree to ~1e-7
        v = judge.check("golden", case.dtype, logits.float(), golden)
        return Drift(case.name, side, v.passed, f"max|Δlogit|/max|logit| = {v.error:.3g} (≤ {v.bound:.3g})", moved)
    v = judge.check("golden-kl", case.dtype, logits, golden)
    agree = metrics.argmax_agreement(logits.double(), golden)
    return Drift(case.name, side, v.passed, f"median KL = {v.error:.3g} (≤ {v.bound:.3g}), argmax agreement {agree:.1%}",
                 moved)


def drift_report(results: list[Drift], manifest: dict) -> str:
    from .report import environment, table
    env = environment()
    lines = ["# Golden drift report", "",
             f"Goldens written with transformers {manifest['transformers']}, torch {manifest['torch']}, "
             f"Python {manifest['python']}; checked now with transformers {env['transformers']}, "
             f"torch {env['torch']}, Python {env['python']}.", "",
             f"**{'NO DRIFT' if all(r.passed for r in results) else 'DRIFT'}**", ""]
    rows = [(r.case, r.side, "ok" if r.passed else "DRIFT", r.measure,
             "<br>".join(f"`{n}` {d:.2g}" for n, d in r.moved if d > 0) or "none") for r in results]
    lines.append(table(rows, ["case", "checked", "verdict", "logits", "trace points whose rms moved most (relative)"]))
    return "\n".join(lines) + "\n"


__all__ = ["CASES", "GoldenCase", "GoldenError", "regenerate", "check", "drift_report", "load_manifest"]

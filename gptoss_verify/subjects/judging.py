"""A subject judged against the float64 truth with the one judge (`judge.check`).

The truth is our plain reference in float64 on the case's weights as the subject gets them (rounded
to the case's dtype, then widened), so only the arithmetic is judged, not the weights' rounding.
In float64 a subject is held to the truth directly (kind `oracle`). In a low precision the truth
rule applies: the subject passes a point when its error against the truth is at most the factor ×
our plain reference's error in the same dtype, plus the floor (kind `truth`), point by point where
it exposes points; its logits are always judged on next-token distributions (kind `free-logits`).
A token whose chosen expert set differs between subject, reference and truth at a layer (a bf16
near-tie) is left out of its own later points, and, from the next layer on, so is every later token
of its sequence (their attention reads it); the counts are in `Verdict.excluded` and the expert
choice itself is judged by the routing kind (`flipped_tokens`). A subject that does not expose
`topk_idx` is judged in a low precision up to the first routing only, then on next-token
distributions: its flips cannot be told apart from errors.
"""
from __future__ import annotations

import dataclasses

import torch

from .. import metrics
from ..judge import Verdict, check
from .ours import Ours
from .protocol import Case, Output, layer_name, ordered_names, point_names, split_name, validate_output


@dataclasses.dataclass
class Cell:
    name: str          # a trace name, or "next-token" for the distributions
    verdict: Verdict


@dataclasses.dataclass
class SubjectVerdict:
    subject: str
    dtype: str
    cells: list[Cell]
    not_judged: dict[str, str] = dataclasses.field(default_factory=dict)  # handed back, not judged: why
    floors: list[str] = dataclasses.field(default_factory=list)  # the subject's stated floors that applied

    @property
    def passed(self) -> bool:
        return all(c.verdict.passed for c in self.cells)

    @property
    def first_failure(self) -> Cell | None:
        return next((c for c in self.cells if not c.verdict.passed), None)


def truth_and_reference(case: Case) -> tuple[Output, Output | None]:
    """Our float64 truth and our plain reference in the case's dtype (None in float64)."""
    rounded = case.dense_state()
    wide = dataclasses.replace(case, state={n: t.double() if t.is_floating_point() else t for n, t in rounded.items()},
                               checkpoint=None, dtype=torch.float64)
    ours = Ours("reference")
    truth = _on_cpu(ours.run(wide))  # judged on the CPU, where subjects' answers are brought
    ref = None if case.dtype == torch.float64 else _on_cpu(ours.run(dataclasses.replace(case, state=rounded,
                                                                                           checkpoint=None)))
    return truth, ref


def _on_cpu(out: Output) -> Output:
    return Output(out.logits.cpu(), {n: t.cpu() for n, t in out.points.items()})


AFTER_ROUTING = ("topk_weights", "mlp_out", "resid_mlp")


def flipped_tokens(num_layers: int, shape: torch.Size, got: dict, truth: Output, ref: Output | None):
    """`left_out(name)` -> bool [B, S]: the tokens not judged at point `name`.

    A routing near-tie (bf16) can send a token to another expert set in the subject or in our plain
    reference than in the truth; from that layer's routing on, that token's points measure the
    other experts, not an error. Later layers' attention reads the flipped token, so from the next
    layer on every later token of its sequence (causal attention; a full layer reaches them all) is
    left out too. The subject's flips are known only where it exposes `topk_idx`; the reference's
    always are. The counts go into each cell's `Verdict.excluded`."""
    own = torch.zeros(shape, dtype=torch.bool)      # flipped at this layer or before
    spread = torch.zeros(shape, dtype=torch.bool)   # read a token flipped at an earlier layer
    at_layer: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for i in range(num_layers):
        idx, flipped = layer_name(i, "topk_idx"), torch.zeros(shape, dtype=torch.bool)
        if ref is not None:
            flipped |= ~metrics.same_expert_set(ref.points[idx].cpu(), truth.points[idx])
        if idx in got:
            flipped |= ~metrics.same_expert_set(got[idx].cpu(), truth.points[idx])
        before = own | spread
        own = own | flipped
        at_layer[i] = (before, own | spread)
        spread = spread | (flipped.cumsum(1) > 0)
    head = own | spread

    def left_out(name: str) -> torch.Tensor:
        layer, point = split_name(name)
        if layer is None:
            return head if name != "embed" else torch.zeros(shape, dtype=torch.bool)
        before, after = at_layer[layer]
        return after if point in AFTER_ROUTING else before
    return left_out


NO_ROUTING = ("it exposes no topk_idx, so its routing flips cannot be told from errors "
              "(judged on the next-token distributions instead)")
ALL_LEFT_OUT = "every token was left out (each was routed elsewhere, or read a token that was, at an earlier layer)"


def _after_first_routing(name: str) -> bool:
    layer, point = split_name(name)
    return name in ("final_norm", "logits") or (layer is not None and (layer > 0 or point in AFTER_ROUTING))


def _floor_kinds(floors, case: Case, names: list[str]) -> tuple[dict[str, str], list[str]]:
    """(trace name -> the tolerance kind of the subject's floor that covers it, the floors' `why`
    that cover any judged name) for the case's dtype: a floor covers its `start` point's first
    occurrence and everything after it in trace order."""
    kinds: dict[str, str] = {}
    applied: list[str] = []
    order = ordered_names(case.spec.num_layers)
    for floor in floors:
        if floor.dtype != case.dtype_name:
            continue
        first = next((i for i, n in enumerate(order) if split_name(n)[1] == floor.start), None)
        if first is None:
            continue
        covered = set(order[first:])
        hit = [n for n in names if n in covered]
        kinds.update((n, floor.kind) for n in hit)
        if hit:
            applied.append(f"{floor.kind} from {floor.start} on: {floor.why}")
    return kinds, applied


def judge_output(output: Output, case: Case, exposed: tuple[str, ...], subject: str = "subject",
                 baseline: tuple[Output, Output | None] | None = None, floors=()) -> SubjectVerdict:
    """Judge a subject's (validated) output. `exposed` are the point names to judge (those the
    subject states it exposes and handed back); `baseline` reuses `truth_and_reference(case)`;
    `floors`: the subject's stated `Floor`s (their kind replaces the default where they apply)."""
    truth, ref = baseline or truth_and_reference(case)
    dtype = case.dtype
    cells: list[Cell] = []
    got = {"logits": output.logits, **output.points}
    names = [n for n in point_names(case.spec, tuple(exposed)) if n in got and split_name(n)[1] != "input"]
    not_judged: dict[str, str] = {}
    if ref is not None and "topk_idx" not in exposed:  # its own flips are unknown: no point after routing
        cut = next((i for i, n in enumerate(names) if _after_first_routing(n)), len(names))
        not_judged.update((n, NO_ROUTING) for n in names[cut:])
        names = names[:cut]
    left_out = flipped_tokens(case.spec.num_layers, case.input_ids.shape, got, truth, ref)
    floor_kind, applied = _floor_kinds(floors, case, names + ["logits"])
    for name in names:
        point = split_name(name)[1]
        s, t = got[name].cpu(), truth.points.get(name, truth.logits if name == "logits" else None)
        r = None if ref is None else ref.points.get(name, ref.logits if name == "logits" else None)
        keep = ~left_out(name)
        tokens = None if keep.all() else keep
        if not keep.any():  # every token read a flipped one: nothing is left to judge here
            not_judged[name] = ALL_LEFT_OUT
        elif point == "topk_idx":  # agreement among the tokens whose inputs are still comparable
            cells.append(Cell(name, check("routing", dtype, s, t, tokens=tokens)))
        elif name in floor_kind:
            cells.append(Cell(name, _check_floor(floor_kind[name], dtype, s, t, r, tokens)))
        elif ref is None:
            cells.append(Cell(name, check("oracle", dtype, s, t, tokens=tokens)))
        else:
            cells.append(Cell(name, check("truth", dtype, s, t, r, tokens=tokens)))
    if ref is None:
        if "logits" not in names:
            kind = floor_kind.get("logits", "oracle")
            cells.append(Cell("logits", check(kind, dtype, output.logits.cpu(), truth.logits)))
    else:
        cells.append(Cell("next-token", check("free-logits", dtype, output.logits.cpu(), truth.logits, ref.logits)))
    return SubjectVerdict(subject, case.dtype_name, cells, not_judged, applied)


def _check_floor(kind: str, dtype, s, t, r, tokens):
    from ..tolerances import TRUTH, kind as kind_of
    return check(kind, dtype, s, t, r if kind_of(kind).rule == TRUTH else None, tokens=tokens)


def judge_subject(subject, case: Case, baseline=None) -> SubjectVerdict:
    """Run `subject` on `case`, check what it hands back, judge it."""
    output = validate_output(subject.run(case), case, where=f"subject {subject.name}")
    exposed = tuple(p for p in subject.points if p == "logits" or any(split_name(n)[1] == p for n in output.points))
    return judge_output(output, case, exposed, subject.name, baseline, getattr(subject, "floors", ()))


__all__ = ["Cell", "SubjectVerdict", "judge_output", "judge_subject", "truth_and_reference", "layer_name"]

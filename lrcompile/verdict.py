"""What a verification means: the verdict on the compressed model's outputs, and the rule behind it.

Pure: it reads the per-output comparisons of ``lrcompile.verify`` (as dicts) and returns a
``Verdict``; nothing here runs a model.

Lossy compression at a ratio the user chose legitimately moves outputs a lot: plain SVD at
``--ratio 0.5`` on MiniLM's trained weights keeps a mean embedding cosine of 0.27, a relative L2
error above 1. An accuracy limit is therefore the user's to set (``--tolerance`` on the relative L2
error, ``--min-cosine`` on the cosine); without one, lrcompile imposes none. What it always checks
is that no output is **broken** (a failure no compression ratio explains):

- **finite**: an output the original computes finitely must not hold NaN or Inf;
- **varies with the input**: where the original's output differs between the samples of the first
  axis (or, with one sample or no batch axis, between its values), the compressed one must too
  (its variation above ``CONSTANT_RTOL`` times the original's): an output that became constant (all
  zeros, a bias alone, a saturated activation) no longer depends on the input;
- **carries signal**: its cosine to the original's must be above 0. A cosine <= 0 means no scaling
  of it comes closer to the original than an all-zero output (its relative L2 error is then >= 1
  at every scale); any legitimate truncation keeps a positive correlation.

These checks apply to floating-point outputs; an integer or boolean output (indices, labels, masks)
legitimately changes with lossy compression, so the default only reports how many values differ.

An output the original itself computes as NaN or Inf cannot be compared: the verdict is
``UNVERIFIED`` (the output is written; pass ``--inputs`` on which the original is finite), or
``FAILED`` when a limit was given, since the limit cannot be shown to hold.

Statuses: ``FAILED`` when any output fails (exit code 3, nothing written), else ``UNVERIFIED`` when
an output could not be compared or none could be judged, else ``PASSED``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

#: An output varies no more than this fraction of the original's variation: it counts as constant.
#: Float32 rounding alone moves values by ~1e-7 relative; an output that still depends on the input
#: through a weak path varies far more.
CONSTANT_RTOL = 1e-6

DEFAULT_RULE = ("default check (no --tolerance/--min-cosine): every float output finite, varying with the input "
                "where the original's does, and with cosine > 0 to the original's; the lossy error itself is not "
                "limited (set --tolerance or --min-cosine for that)")


@dataclass
class OutputVerdict:
    """One output's verdict: ``passed``, ``failed``, ``unverified`` (cannot be compared) or
    ``unjudged`` (the rule says nothing about it), with the reasons."""

    name: str
    status: str = "passed"
    reasons: list[str] = field(default_factory=list)

    def fail(self, reason: str) -> None:
        self.status = "failed"
        self.reasons.append(reason)


@dataclass
class Verdict:
    """The run's verdict: ``status`` (PASSED, FAILED, UNVERIFIED), the ``rule`` it applied
    (``default`` or ``limits``) in words (``description``), and each output's verdict."""

    status: str
    rule: str
    description: str
    outputs: list[OutputVerdict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[str]:
        """Why it FAILED: one line per failed check."""
        return [r for o in self.outputs if o.status == "failed" for r in o.reasons]

    @property
    def unverified(self) -> list[str]:
        """Why it is UNVERIFIED: outputs that could not be compared, or that nothing was judged."""
        return [r for o in self.outputs if o.status == "unverified" for r in o.reasons] + self.notes

    def to_dict(self) -> dict:
        return {"status": self.status, "rule": self.rule, "description": self.description,
                "outputs": [asdict(o) for o in self.outputs], "notes": list(self.notes)}


def describe_limits(tolerance: float | None, min_cosine: float | None) -> str:
    parts = ([f"relative L2 error <= --tolerance {tolerance:g}"] if tolerance is not None else []) + \
            ([f"cosine >= --min-cosine {min_cosine:g}"] if min_cosine is not None else [])
    return ("limits on every output: " + " and ".join(parts)
            + "; and every float output finite, varying with the input where the original's does, with cosine > 0")


def judge(diffs: list[dict] | None, *, tolerance: float | None = None, min_cosine: float | None = None) -> Verdict:
    """The verdict on ``diffs`` (``OutputDiff.to_dict()`` of each output; None: not verified).

    With ``tolerance`` / ``min_cosine`` an output fails when its relative L2 error exceeds the
    tolerance or its cosine falls below the minimum (a NaN never meets a limit), as well as when it
    is broken; without them only a broken output fails (see the module docstring).
    """
    limits = tolerance is not None or min_cosine is not None
    if diffs is None:
        return Verdict("UNVERIFIED", "none", "not verified (--no-verify)")
    verdict = Verdict("PASSED", "limits" if limits else "default",
                      describe_limits(tolerance, min_cosine) if limits else DEFAULT_RULE)
    for d in diffs:
        o = _judge_output(d, tolerance, min_cosine)
        verdict.outputs.append(o)
    judged = [o for o in verdict.outputs if o.status in ("passed", "failed")]
    if any(o.status == "failed" for o in verdict.outputs):
        verdict.status = "FAILED"
    elif any(o.status == "unverified" for o in verdict.outputs):
        verdict.status = "UNVERIFIED"
    elif not judged:
        verdict.status = "UNVERIFIED"
        verdict.notes.append("no output could be judged by the default check (each output's reason is in its "
                             "verdict); set --tolerance or --min-cosine" if verdict.outputs else
                             "the model has no output to compare")
    return verdict


def _count(nf: dict) -> str:
    return " and ".join(f"{n} {word}" for word, n in (("NaN", nf.get("nan", 0)), ("Inf", nf.get("inf", 0))) if n)


def _values(d: dict) -> int:
    return math.prod(d["shape"])


def _judge_output(d: dict, tolerance: float | None, min_cosine: float | None) -> OutputVerdict:
    name, o = d["name"], OutputVerdict(d["name"])
    limits = tolerance is not None or min_cosine is not None
    nf = d.get("nonfinite") or {}
    bad_ref, bad_got = _count(nf.get("original", {})), _count(nf.get("compressed", {}))
    if bad_ref:
        why = f"the original's output {name!r} holds {bad_ref} of {_values(d):,} values, so it cannot be compared"
        if limits:
            o.fail(f"{why}: the limit cannot be shown to hold; pass --inputs on which the original's outputs are finite")
        else:
            o.status = "unverified"
            o.reasons.append(f"{why}; pass --inputs on which the original's outputs are finite")
        return o
    if bad_got:
        o.fail(f"output {name!r} holds {bad_got} of {_values(d):,} values where the original's are all finite")
        return o
    is_float = str(d.get("dtype", "float32")).startswith(("float", "bfloat", "complex"))
    if is_float:
        _broken(d, o)
    elif not limits and d["max_abs"] != 0:
        o.status = "unjudged"
        o.reasons.append(f"output {name!r} ({d.get('dtype')}) differs from the original's (max abs difference "
                         f"{d['max_abs']:g}); integer outputs change legitimately with lossy compression, so the "
                         "default check does not judge them (set --tolerance or --min-cosine)")
    if tolerance is not None and not d["rel_l2"] <= tolerance:  # as before: a NaN fails
        o.fail(f"output {name!r} rel L2 error {d['rel_l2']:.3e} > --tolerance {tolerance:g}")
    if min_cosine is not None and not d["cosine"] >= min_cosine:
        o.fail(f"output {name!r} cosine {d['cosine']:.6f} < --min-cosine {min_cosine:g}")
    return o


def _broken(d: dict, o: OutputVerdict) -> None:
    """The default's checks of a finite float output: it varies where the original does, and its
    cosine to the original's is positive."""
    name = d["name"]
    var = d.get("variation") or {}
    v_ref, v_got = var.get("original"), var.get("compressed")
    if v_ref is None or v_ref == 0:
        if d["max_abs"] != 0:  # the original's output is constant here: its cosine and variation say nothing
            o.status = "unjudged"
            o.reasons.append(f"the original's output {name!r} does not vary on these inputs, so the default check "
                             "cannot judge it; pass --inputs on which it does, or set --tolerance")
        return
    samples = len(d["shape"]) >= 2 and d["shape"][0] >= 2
    if v_got is not None and v_got <= CONSTANT_RTOL * v_ref:
        o.fail(f"output {name!r} " + (f"is the same for all {d['shape'][0]} samples while the original's differ "
                                      f"(by up to {v_ref:.3g}): it no longer depends on the input" if samples else
                                      f"is constant while the original's values span {v_ref:.3g}: it carries no signal"))
        return
    if not d["cosine"] > 0:
        o.fail(f"output {name!r} cosine {d['cosine']:.3g} <= 0 (rel L2 error {d['rel_l2']:.3g}): no better than an "
               "all-zero output at any scale, it carries no signal")

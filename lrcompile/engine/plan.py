"""The plan: per candidate, its form and fitted value, or why it stays dense.

A ``Plan`` accumulates over stages (sequential calibration plans one stage at a time). Each
distinct weight is factorized once (nodes sharing a weight share its value, a node that reads it
transposed gets the form's transposed value: ``W^T ~= C^T A^T``); a planner hands in the size per
weight (``ranks``), else each weight's size comes from the config's rank policy. A weight that
stays dense keeps the stored tensors it reads, so a weight computed from the same ones stays
dense too (its rewrite would save nothing).
Other modules ask the plan questions and tell it decisions through its methods, never by editing
its fields.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Iterator

from tqdm.auto import tqdm

from ..config import CompileConfig
from ..factorize import RankPolicy
from ..forms import CONV_FORMS, DEFAULT, form_for
from ..ir import Candidate
from ..parallel import InProcess, Runner, Task
from ..weights import portable, release, resolve
from ..report import LayerRecord
from .analysis import sharers as by_weight
from .evidence import Evidence


def factorize_layer(cand: Candidate, config: CompileConfig, policy: RankPolicy, method: str, stats: list,
                    form: str = DEFAULT):
    """Fit ``cand``'s weight in ``form`` under ``policy`` with ``method`` and its statistics."""
    f = form_for(cand.pass_name, form)
    options = {"solver": config.solver, "seed": config.seed, **config.method_options}
    options.update({k: getattr(config, k) for k in getattr(f, "knobs", ())})
    return f.fit(cand, policy, method, stats, options)


@dataclass(frozen=True)
class Refused:
    """A fit the size cannot host (the form's ``ValueError``), as a value a worker can return."""

    reason: str


def fit_unit(cand: Candidate, config: CompileConfig, policy: RankPolicy, method: str, stats: list, form: str,
             auto: bool) -> tuple[str, object]:
    """One weight's fit, a task of ``lrcompile.parallel``: ``(form name, value)``, the value a
    :class:`Refused` when the form cannot host the size; ``auto``: the best form
    (:func:`best_form`). Weights that came as file references are mapped here and released after."""
    with attached(cand) as cand:
        try:
            if auto:
                f, value = best_form(cand, config, policy, method, stats)
                return f.name, value
            return form, factorize_layer(cand, config, policy, method, stats, form)
        except ValueError as e:
            return form, Refused(str(e))


def detached(cand: Candidate) -> Candidate:
    """``cand`` without its place in the graph (the node stands alone: same op, name and
    attributes), so that it travels to a worker without the graph it came from; a weight mapped
    from the model's external data travels as a reference to its bytes (``weights.portable``)."""
    import onnx_graphsurgeon as gs

    node = gs.Node(op=cand.node.op, name=cand.label, domain=cand.node.domain,
                   attrs={k: v for k, v in cand.node.attrs.items() if not isinstance(v, gs.Tensor)})
    return replace(cand, node=node, matrices=[portable(m) for m in cand.matrices])


@contextmanager
def attached(cand: Candidate) -> Iterator[Candidate]:
    """The other end of :func:`detached`, in the task: ``cand`` with the weights that came as
    file references mapped (``weights.resolve``), their pages released when the block ends."""
    cand = replace(cand, matrices=[resolve(m) for m in cand.matrices])
    try:
        yield cand
    finally:
        release(*cand.matrices)


#: ``--form auto``: each weight takes the form with the least error at its size.
AUTO = "auto"


def best_form(cand: Candidate, config: CompileConfig, policy: RankPolicy, method: str, stats: list):
    """``--form auto`` under a rank policy: fit ``cand`` in every form that serves it at the
    policy's size and keep the one with the least objective error among those that save
    something and store no more than the default form at that size (a form whose size is its
    pattern, N:M, may not fit a small budget); the default form when none does. Returns
    ``(form, value)``."""
    from ..forms import FORMS, LAYER_OPS

    best = None
    for f in FORMS.values():
        if cand.pass_name not in f.ops or not set(f.ops) & set(LAYER_OPS):
            continue
        if hasattr(f, "refuses") and f.refuses(cand, {k: getattr(config, k) for k in f.knobs}):
            continue
        try:
            value = factorize_layer(cand, config, policy, method, stats, f.name)
        except ValueError:  # the size cannot host this form
            continue
        err = f.errors(cand, value)[1]
        fits = f.storage(value).params <= budget_of(cand, policy) + sum(m.shape[1] for m in cand.matrices)  # (+ a bias)
        if fits and not f.declines(value) and (best is None or err < best[0]):
            best = (err, f, value)
    if best is None:
        f = form_for(cand.pass_name, DEFAULT)
        return f, factorize_layer(cand, config, policy, method, stats, DEFAULT)
    return best[1], best[2]


def budget_of(cand: Candidate, policy: RankPolicy) -> float:
    """The parameters a rank policy gives ``cand``'s weight: ``ratio K N`` or ``rank (K + N)`` per
    group (an energy or error target: the whole weight)."""
    total = 0.0
    for m in cand.matrices:
        k, n = m.shape
        total += (policy.ratio * k * n if policy.ratio is not None else
                  policy.rank * (k + n) if policy.rank is not None else k * n)
    return total


@dataclass
class Plan:
    """Per-candidate decisions (``records``) and the fitted value of each weight key."""

    records: list[LayerRecord] = field(default_factory=list)
    _values: dict[str, object] = field(default_factory=dict)
    _forms: dict[str, str] = field(default_factory=dict)
    _owner: dict[str, str] = field(default_factory=dict)
    _dense: dict[str, str] = field(default_factory=dict)  # weight key -> why it stays dense
    _transposed: dict[str, bool] = field(default_factory=dict)  # weight key -> its value fits W^T
    _views: dict[str, object] = field(default_factory=dict)  # weight key -> the value for the other orientation
    _stored: dict[str, dict[str, int]] = field(default_factory=dict)  # weight key -> stored tensors it reads: values
    _params: dict[str, int] = field(default_factory=dict)  # weight key -> its parameters

    # ------------------------------------------------------------------ questions

    def __bool__(self) -> bool:
        """Whether anything is to be rewritten."""
        return bool(self._values)

    def value(self, key: str):
        """Weight ``key``'s value, in the orientation of the node it was fitted for."""
        return self._values.get(key)

    def value_for(self, cand: Candidate):
        """The value ``cand`` is rewritten with: its weight's value, transposed when ``cand`` reads
        the weight in the other orientation (``W^T ~= C^T A^T``)."""
        key = cand.weight_key
        if key not in self._values or cand.transposed == self._transposed.get(key, cand.transposed):
            return self._values.get(key)
        return self._views[key]

    def form(self, key: str):
        """The form object of weight ``key``'s value."""
        from ..forms import FORMS

        return FORMS[self._forms[key]]

    def dense_reasons(self) -> dict[str, str]:
        """Weight key -> why it stays dense, for every key decided dense so far."""
        return dict(self._dense)

    def sizes(self) -> dict[str, int]:
        """Weight key -> chosen size (0: dense), as a planner's ``ranks``."""
        return {r.weight: (r.rank if r.decision == "factorized" else 0) for r in self.records}

    def forms(self) -> dict[str, str]:
        """Weight key -> the name of its value's form, for every key with a value."""
        return dict(self._forms)

    def accepted(self) -> set[str]:
        """Labels of the candidates to rewrite."""
        return {r.node for r in self.records if r.decision == "factorized" and r.weight in self._values}

    # ------------------------------------------------------------------ decisions

    def keep_dense(self, key: str, reason: str, *, couple: set[str] | None = None) -> None:
        """Weight ``key`` stays dense: its value is dropped and its records say why. A weight
        computed from the same stored tensors stays dense too when those hold as many values as it
        (``couple``: only among these keys), since its rewrite would keep them and add factors."""
        self._values.pop(key, None)
        self._forms.pop(key, None)
        self._views.pop(key, None)
        self._dense[key] = reason
        for rec in self.records:
            if rec.weight == key and rec.decision == "factorized":
                rec.decision, rec.reason = "declined", reason
        stored = self._stored.get(key, {})
        for other in list(self._values):
            common = sorted(set(stored) & set(self._stored.get(other, {})))
            if (common and (couple is None or other in couple)
                    and sum(stored[n] for n in common) >= self._params.get(other, 0)):
                self.keep_dense(other, f"weight {common[0]} stays: {key} reads it too and stays dense "
                                       f"({reason}); rewriting this node would keep it and add the factors, "
                                       "saving nothing", couple=couple)

    def put(self, cand: Candidate, value, size: int, form: str = DEFAULT) -> None:
        """Record a value made elsewhere (a timing micro model's random factors) for ``cand``."""
        self.records.append(LayerRecord(node=cand.label, op=cand.node.op, shape=list(cand.matrices[0].shape),
                                        decision="factorized", weight=cand.weight_key, rank=size))
        self._values[cand.weight_key] = value
        self._forms[cand.weight_key] = form
        self._owner[cand.weight_key] = cand.label
        self._transposed[cand.weight_key] = cand.transposed

    def note_written(self, ctx) -> None:
        """After a rewrite: each factorized record's ``stored_after``, the names of the tensors
        its weight is stored in now (its factors and corrections, as ``ctx`` stored them, and the
        tensors it was read from, should anything still read them)."""
        for rec in self.records:
            if rec.decision == "factorized" and rec.weight in ctx.stored:
                rec.stored_after = [c.name for c in ctx.stored[rec.weight]] + list(rec.stored_before or {})

    def _intent(self, cand: Candidate, config: CompileConfig, forms: dict[str, str] | None,
                ranks: dict[str, int] | None, dense_reasons: dict[str, str]):
        """``(form, auto, why)``: the form ``cand``'s weight is to take (``auto``: the best of
        all), and why it stays dense before any fit (None: it is fitted). Changes nothing."""
        name = (forms or {}).get(cand.weight_key) or config.form_for(cand.label)
        auto, why = name == AUTO, None
        try:
            form = form_for(cand.pass_name, DEFAULT if auto else name)
        except KeyError as e:
            if name not in CONV_FORMS:  # a conv form names what k x k convs become; others keep the default
                why = e.args[0]
            form = form_for(cand.pass_name, DEFAULT)
        refuses = getattr(form, "refuses", None)
        refused = refuses(cand, {k: getattr(config, k) for k in form.knobs}) if refuses else None
        if refused and form.name in CONV_FORMS:  # a 1 x 1 conv: a matrix, the default form serves it
            form, refused = form_for(cand.pass_name, DEFAULT), None
        why = why or refused
        if why is None and ranks is not None and not ranks.get(cand.weight_key):
            why = dense_reasons.get(cand.weight_key, "kept dense by the rank allocation")
        return form, auto, why

    def _fit_new(self, cands, config, evidence, policy, groups, *, ranks, forms, dense_reasons, cache, runner,
                 progress) -> dict[str, tuple[str, object, float | None]]:
        """Fit every weight of ``cands`` that this plan has not decided yet, each once (at its
        first candidate), as tasks of ``runner``. Returns weight key -> ``(form name, value or
        Refused, seconds or None)``; a value from ``cache`` has no seconds."""
        seen = set(self._values) | set(self._dense)
        out, keys = {}, []

        def tasks():  # made as the runner has room: a task holds its weight's statistics
            for cand, (name, pol, method, st, auto) in keys:
                yield Task(cand.label, fit_unit, (detached(cand), config, pol, method, st, name, auto))

        for cand in cands:
            key = cand.weight_key
            if key in seen:
                continue
            seen.add(key)
            form, auto, why = self._intent(cand, config, forms, ranks, dense_reasons)
            if why:
                continue
            method, st, _ = evidence.for_layer(cand, config.method_for(cand.label), groups[key])
            pol = policy if ranks is None else RankPolicy(rank=int(ranks[key]), multiple=1)
            ck = (key, form.name, pol.rank) if cache is not None and pol.rank is not None else None
            if ck is not None and ck in cache:
                out[key] = (form.name, cache[ck], None)
                continue
            keys.append((cand, (form.name, pol, method, st, auto)))
        results = (runner or InProcess()).imap(tasks(), what="fit", progress=progress, timed=True)
        for (cand, (_, pol, _, _, auto)), ((name, value), seconds) in zip(keys, results):
            out[cand.weight_key] = (name, value, seconds)
            ck = (cand.weight_key, name, pol.rank) if cache is not None and pol.rank is not None and not auto else None
            if ck is not None and not isinstance(value, Refused):
                cache[ck] = value
        return out

    def decide(self, cands: list[Candidate], config: CompileConfig, evidence: Evidence | None = None, *,
               progress: bool = False, ranks: dict[str, int] | None = None, forms: dict[str, str] | None = None,
               dense_reasons: dict[str, str] | None = None, cache: dict | None = None,
               runner: Runner | None = None) -> "Plan":
        """Fit each distinct weight of ``cands`` once and decide per candidate.

        Args:
            ranks: weight key -> size chosen by a planner (``lrcompile.planner``), 0 = keep dense;
                None: each weight's size comes from the config's rank policy. Keys missing from a
                given dict stay dense.
            forms: weight key -> the form its size is in (missing: the config's form for the node,
                ``--form`` / ``--layer-form``).
            dense_reasons: weight key -> why the planner kept it dense (for the report).
            cache: ``(weight key, form, size) -> value``, shared by a planner's repeated plans.
            runner: where the fits run (``lrcompile.parallel``; default: here, one after another).
                The decisions are taken here, in the order of ``cands``, whatever ran the fits.
        """
        evidence = evidence or Evidence()
        policy = config.policy()
        dense_reasons = dense_reasons or {}
        groups = by_weight(cands)
        fitted = self._fit_new(cands, config, evidence, policy, groups, ranks=ranks, forms=forms,
                               dense_reasons=dense_reasons, cache=cache, runner=runner, progress=progress)
        for cand in tqdm(cands, desc="factorize", unit="layer", disable=None if progress else True, leave=False):
            form, auto, why = self._intent(cand, config, forms, ranks, dense_reasons)
            if why:
                self._dense.setdefault(cand.weight_key, why)
            rec = LayerRecord(node=cand.label, op=cand.node.op, shape=list(cand.matrices[0].shape),
                              decision="factorized", weight=cand.weight_key, groups=len(cand.matrices),
                              params_before=cand.params, break_even=round(form.break_even(cand), 2),
                              stored_before={k: list(v) for k, v in cand.stored.items()} or None)
            key = cand.weight_key
            self._stored.setdefault(key, {n: v for n, (v, _) in cand.stored.items()})
            self._params.setdefault(key, cand.params)
            if ranks is not None and not ranks.get(key):
                self._dense.setdefault(key, dense_reasons.get(key, "kept dense by the rank allocation"))
            if key in self._dense:
                rec.decision, rec.reason = "declined", self._dense[key]
                self.records.append(rec)
                continue
            if key in self._values:
                value = self._values[key]
                rec.shared_with = self._owner[key]
                if cand.transposed != self._transposed[key]:
                    value = self._views.get(key)
                    if value is None:  # the owner was fitted without knowing of this use
                        view = form.transpose(self._values[key])
                        if isinstance(view, str):
                            self.keep_dense(key, f"{view} ({cand.label} reads {key} transposed)")
                            rec.decision, rec.reason = "declined", self._dense[key]
                            self.records.append(rec)
                            continue
                        value = self._views[key] = view
            else:
                _, _, rec.reason = evidence.for_layer(cand, config.method_for(cand.label), groups[key])
                name, value, seconds = fitted[key]
                form = form_for(cand.pass_name, name)
                if isinstance(value, Refused):
                    if form.name == DEFAULT:
                        raise ValueError(value.reason)
                    why = f"{form.name}: {value.reason}"  # e.g. a budget too small for the form's parts
                    self._dense[key] = why
                    rec.decision, rec.reason = "declined", why
                    self.records.append(rec)
                    continue
                rec.seconds = round(seconds, 4) if seconds is not None else None
            rec.rank, rec.method, rec.info = form.size(value), form.method(value), form.info(value)
            rec.params_after = form.storage(value).params
            rec.rel_error, rec.objective_error = form.errors(cand, value)
            release(*cand.matrices)  # a mapped weight's pages: read again from the file if needed
            why = None if config.keep_unprofitable else form.declines(value)
            if not why and key not in self._values and cand.details.get("both_orientations"):
                view = form.transpose(value)  # a node reads this weight transposed: one value serves both
                why = f"{view} ({key} is also read transposed)" if isinstance(view, str) else None
                if why is None:
                    self._views[key] = view
            if why:
                rec.decision, rec.reason = "declined", why
                self._dense[key] = why
            elif key not in self._values:
                self._values[key] = value
                self._forms[key] = form.name
                if form.name != DEFAULT:
                    rec.info = {**(rec.info or {}), "form": form.name}
                self._owner[key] = cand.label
                self._transposed[key] = cand.transposed
            self.records.append(rec)
        keys = {c.weight_key for c in cands}  # (earlier calls' weights may be rewritten already)
        for key in list(self._dense):  # a dense weight keeps what it reads
            if self._stored.get(key):
                self.keep_dense(key, self._dense[key], couple=keys)
        return self


def plan(cands: list[Candidate], config: CompileConfig, evidence: Evidence | None = None, **kw) -> Plan:
    """A new :class:`Plan` for ``cands`` (see :meth:`Plan.decide`)."""
    return Plan().decide(cands, config, evidence, **kw)


__all__ = ["AUTO", "Plan", "Refused", "attached", "best_form", "detached", "factorize_layer", "fit_unit", "plan"]

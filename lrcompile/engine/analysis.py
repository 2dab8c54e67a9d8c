"""Candidate analysis: which nodes a pass can rewrite, which it declines and why (reasons as
values), and how candidates group into calibration stages. ``lrcompile inspect`` shows this."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import onnx
import onnx_graphsurgeon as gs

from ..config import CompileConfig
from ..ir import FOLDABLE_OPS, Candidate, ConstantResolver, Decline, node_label
from ..report import LayerRecord
from ..weights import import_graph, release_constants


@dataclass
class Analysis:
    """What the candidate search found in a model."""

    graph: gs.Graph
    candidates: list[Candidate]
    declines: list[Decline]
    folded: list[str] = field(default_factory=list)


def selected(label: str, op: str, config: CompileConfig) -> bool:
    """Whether --only/--exclude/--include let a node be compressed."""
    return ((config.only is None or op in config.only) and not any(re.search(p, label) for p in config.exclude)
            and (not config.include or any(re.search(p, label) for p in config.include)))


def _subgraph_nodes(graph: gs.Graph):
    for node in graph.nodes:
        for attr in node.attrs.values():
            subs = attr if isinstance(attr, list) else [attr]
            for sub in subs:
                if isinstance(sub, gs.Graph):
                    for inner in sub.nodes:
                        yield node, inner
                    yield from _subgraph_nodes(sub)


def analyze(model: onnx.ModelProto, config: CompileConfig, skip: frozenset[str] = frozenset()) -> Analysis:
    """Import the model and sort its nodes into candidates and declines (reasons as values); nodes
    labelled in ``skip`` (already compressed another way) are neither."""
    from lrcompile.passes import BY_OP

    graph = import_graph(model)
    consts = ConstantResolver(graph)
    cands: list[Candidate] = []
    declines: list[Decline] = []
    for node in list(graph.nodes):
        p = BY_OP.get(node.op)
        if p is None or node.domain not in (None, "", "ai.onnx"):
            continue
        label = node_label(node)
        if label in skip:
            continue
        if config.only is not None and node.op not in config.only:
            declines.append(Decline(node, p.name, f"op not selected (--only {','.join(config.only)})"))
            continue
        hit = next((pat for pat in config.exclude if re.search(pat, label)), None)
        if hit:
            declines.append(Decline(node, p.name, f"excluded by --exclude {hit!r}"))
            continue
        if config.include and not any(re.search(pat, label) for pat in config.include):
            declines.append(Decline(node, p.name, "name not matched by --include"))
            continue
        m = p.match(node, consts)
        release_constants(node.inputs)  # the match read the weight (and checked it): its pages can go
        if m is None:
            continue
        if isinstance(m, Candidate) and m.params < config.min_params:
            m = Decline(node, p.name, f"too small to matter ({m.params} params < --min-params {config.min_params})",
                        m.shape)
        if isinstance(m, Candidate):
            m.stored = consts.leaves(m.weight_key)
        (cands if isinstance(m, Candidate) else declines).append(m)
    parents = {}
    for parent, inner in _subgraph_nodes(graph):
        parents[id(inner)] = parent
        if inner.op in BY_OP:
            declines.append(Decline(inner, BY_OP[inner.op].name,
                                    f"inside a {parent.op} body ({node_label(parent)}); subgraphs are not rewritten"))
    cands, kept = kept_elsewhere(graph, cands, parents)
    declines += kept
    orientations: dict[str, set[bool]] = {}
    for c in cands:
        orientations.setdefault(c.weight_key, set()).add(c.transposed)
    for c in cands:
        if len(orientations[c.weight_key]) > 1:
            c.details["both_orientations"] = True
    return Analysis(graph, cands, declines, consts.folded)


def kept_elsewhere(graph: gs.Graph, cands: list[Candidate], parents: dict[int, gs.Node] | None = None
                   ) -> tuple[list[Candidate], list[Decline]]:
    """Split ``cands`` into those whose rewrite frees their weight and declines for the others.

    Rewriting a node removes its weight only if nothing else reads it: when a node that is not
    rewritten (another op, a declined candidate, a node inside an If/Loop/Scan body) or a graph
    output still reads the weight, or stored tensors it is computed from that hold as many values
    as it, the rewrite would keep the original and add the factors: it saves nothing, so it is
    declined with the reader named. (A small tensor that stays, such as the shape a
    ConstantOfShape weight is made from, does not stop it.) A decline makes its node a reader that
    stays, so this repeats until nothing changes."""
    parents = parents if parents is not None else {id(i): p for p, i in _subgraph_nodes(graph)}
    main = {id(n) for n in graph.nodes}
    outputs = {t.name for t in graph.outputs}
    cands = list(cands)
    declines: list[Decline] = []
    tensors = graph.tensors()
    while True:
        frees = {(id(c.node), c.weight_key) for c in cands}  # (node, the weight tensor it stops reading)
        memo: dict[str, str | None] = {}

        def held(t: gs.Tensor) -> str | None:
            """Why ``t`` stays in the model once every candidate is rewritten (None: it goes)."""
            if t.name in memo:
                return memo[t.name]
            memo[t.name] = None  # a cycle cannot keep a tensor
            why = None
            if t.name in outputs:
                why = f"{t.name} is a graph output"
            for n in t.outputs:
                if why:
                    break
                if id(n) not in main:
                    parent = parents.get(id(n))
                    where = f"a {parent.op} body ({node_label(parent)})" if parent is not None else "a subgraph"
                    why = f"{t.name} is also read inside {where}, which is not rewritten"
                elif (id(n), t.name) in frees:
                    continue
                elif n.op in FOLDABLE_OPS and n.outputs:  # goes with its outputs (a constant subgraph)
                    inner = next((w for w in map(held, n.outputs) if w), None)
                    why = inner and f"{t.name} feeds {node_label(n)} ({n.op}), and {inner}"
                else:
                    why = f"{t.name} is also read by {node_label(n)} ({n.op}), which is not rewritten"
            memo[t.name] = why
            return why

        now = []
        for c in cands:
            why = next((held(t) for t in c.node.inputs if t.name == c.weight_key), None)
            if not why:  # the tensors it is computed from: what stays of them must be smaller than it
                stay = [(held(tensors[n]), v) for n, (v, _) in sorted(c.stored.items())
                        if n != c.weight_key and n in tensors]
                if sum(v for w, v in stay if w) >= c.params:
                    why = next(w for w, _ in stay if w)
            if why:
                declines.append(Decline(c.node, c.pass_name, f"weight {why}: rewriting this node would keep it and "
                                                             "add the factors, saving nothing",
                                        tuple(c.matrices[0].shape)))
            else:
                now.append(c)
        if len(now) == len(cands):
            return cands, declines
        cands = now


def decline_records(declines: list[Decline]) -> list[LayerRecord]:
    return [LayerRecord(node=d.label, op=d.node.op, shape=list(d.shape) if d.shape else None,
                        decision="declined", reason=d.reason) for d in declines]


def stages(graph: gs.Graph, cands: list[Candidate]) -> list[list[Candidate]]:
    """Candidates grouped by their activation tensor, in topological order (sequential calibration).
    Candidates without an activation come last, in one group."""
    order = {id(n): i for i, n in enumerate(graph.toposort().nodes)}
    groups: dict[str | None, list[Candidate]] = {}
    for c in sorted(cands, key=lambda c: order.get(id(c.node), 0)):
        groups.setdefault(c.activation, []).append(c)
    tail = groups.pop(None, [])
    return list(groups.values()) + ([tail] if tail else [])


def sharers(cands: list[Candidate]) -> dict[str, list[Candidate]]:
    """Candidates by weight key (nodes sharing a weight share one factorization), in order."""
    out: dict[str, list[Candidate]] = {}
    for c in cands:
        out.setdefault(c.weight_key, []).append(c)
    return out


__all__ = ["Analysis", "analyze", "decline_records", "kept_elsewhere", "selected", "sharers", "stages"]

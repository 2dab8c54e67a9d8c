"""Candidate analysis: which nodes a pass can rewrite, which it declines and why (reasons as
values), and how candidates group into calibration stages. ``lrcompile inspect`` shows this."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import onnx
import onnx_graphsurgeon as gs

from ..config import CompileConfig
from ..ir import Candidate, ConstantResolver, Decline, node_label
from ..report import LayerRecord


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

    graph = gs.import_onnx(model)
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
        if m is None:
            continue
        if isinstance(m, Candidate) and m.params < config.min_params:
            m = Decline(node, p.name, f"too small to matter ({m.params} params < --min-params {config.min_params})",
                        m.shape)
        (cands if isinstance(m, Candidate) else declines).append(m)
    for parent, inner in _subgraph_nodes(graph):
        if inner.op in BY_OP:
            declines.append(Decline(inner, BY_OP[inner.op].name,
                                    f"inside a {parent.op} body ({node_label(parent)}); subgraphs are not rewritten"))
    return Analysis(graph, cands, declines, consts.folded)


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


__all__ = ["Analysis", "analyze", "decline_records", "selected", "sharers", "stages"]

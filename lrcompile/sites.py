"""Multi-layer sites the planner prices beside single weights: MLP pairs (``lrcompile.pruning``)
and attention head pairs (``lrcompile.attention``), behind one interface.

Each kind keeps its own statistics and fits; this only routes by planner key and writes the
kinds one after the other (MLP widths first, then head dimensions: they touch disjoint nodes, and
each kind finds its sites again on a fresh import of the model it is given).
"""
from __future__ import annotations

import numpy as np
import onnx


class Sites:
    """The union of several site kinds (``MlpPairs``, ``AttentionSites``), by planner key."""

    def __init__(self, **kinds) -> None:
        self.kinds = {name: k for name, k in kinds.items() if k is not None}

    def __getitem__(self, name: str):
        return self.kinds.get(name)

    @property
    def pairs(self) -> dict:
        return {key: pr for k in self.kinds.values() for key, pr in k.pairs.items()}

    @property
    def stats(self) -> dict:
        return {key: st for k in self.kinds.values() for key, st in k.stats.items()}

    def _owner(self, key: str):
        for k in self.kinds.values():
            if key in k.pairs:
                return k
        raise KeyError(key)

    def form(self, key: str):
        return self._owner(key).form(key)

    def curve(self, key: str, grid: np.ndarray) -> np.ndarray:
        return self._owner(key).curve(key, grid)

    def requests(self) -> dict:
        return {key: r for k in self.kinds.values() for key, r in k.requests().items()}

    def take_stats(self, stats: dict) -> None:
        for k in self.kinds.values():
            k.take_stats(stats)

    def pruned_labels(self, widths: dict[str, int]) -> frozenset[str]:
        return frozenset().union(*(k.pruned_labels(widths) for k in self.kinds.values()))

    def reserved(self) -> frozenset[str]:
        """Node labels no low-rank form may take while these sites are priced (fused QKV weights)."""
        return frozenset().union(*(k.reserved() for k in self.kinds.values() if hasattr(k, "reserved")))

    def prune(self, model: onnx.ModelProto, widths: dict[str, int], *, reason: str | dict[str, str],
              progress: bool = False) -> tuple[onnx.ModelProto, list, dict[str, list[dict]]]:
        """``model`` with every kind's chosen sizes written; the records, and the report rows by
        kind. ``reason``: what the records say chose the sizes (one for all, or by kind)."""
        records, rows = [], {}
        for name, k in self.kinds.items():
            why = reason if isinstance(reason, str) else reason[name]
            model, recs, rows[name] = k.prune(model, widths, reason=why, progress=progress)
            records += recs
        return model, records, rows

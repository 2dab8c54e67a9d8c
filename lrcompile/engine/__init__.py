"""The engine: everything a compile, the planner, latency timing, pruning, inspect and bench
share, and nothing that orchestrates them.

- ``analysis``: candidates and declines (``analyze``), calibration stages;
- ``evidence``: what a compile collects (statistics, Fisher, curvature) and what each layer gets;
- ``plan``: per weight, its form and fitted value (``Plan``), the public factorize step;
- ``rewrite``: ``apply`` a plan through the forms, ``export``, ``check_model``, trial ``build``.

ONNX Runtime sessions are made in one place below it, ``lrcompile.sessions`` (calibration,
evaluation, timing, distill's teacher and the ORT target all use it).

The engine never imports the orchestrator (``lrcompile.pipeline``) or the layers above it
(planner, latency, pruning, bench, cli); a test checks it.
"""
from __future__ import annotations

from .analysis import Analysis, analyze, decline_records, selected, sharers, stages
from .evidence import (Evidence, calibration, collect_curvature, collect_fisher, collect_stats, curvature_tensor,
                       mask_input, stat_request)
from .plan import Plan, attached, detached, factorize_layer, plan
from .rewrite import Applied, RewriteError, apply, build, check_model, context, export

__all__ = ["Analysis", "Applied", "Evidence", "Plan", "RewriteError", "analyze", "apply", "attached", "build", "calibration",
           "check_model", "collect_curvature", "collect_fisher", "collect_stats", "context", "curvature_tensor",
           "decline_records", "detached", "export", "factorize_layer", "mask_input", "plan", "selected", "sharers", "stages",
           "stat_request"]

"""Forms: what a layer becomes.

A form is a value that knows one shape of replacement and nothing else knows it: what it stores
(each tensor, its dtype, index overhead: storage bytes and a parameter-equivalent), its FLOPs at
given shapes, the sizes the planner may choose from, the method's error at each size, and how it
emits nodes for each op it applies to (through the op's primitives, ``ir.RewritePass``).
Sparse and sparse + dense forms (``nm``, ``lowrank+sparse``, ``dense-nm``, ``dictionary``) are in
``forms.sparse``; a form that reads options of its own names them in ``knobs`` and may refuse a
candidate (``refuses``: the reason it stays dense). The
engine and the planner ask forms; the numpy math stays in ``lrcompile.factorize``.

The explicit registry: a new form is its math (``factorize/``), its module here, one line in
``FORMS`` below, and its tests.

Two kinds of site exist today. A *layer form* replaces one candidate's weight (``ir.Candidate``;
nodes sharing a weight share one value): ``lowrank``. A *pair form* spans the two layers of an
MLP pair (``passes.mlp.MlpPair``): ``channels``, hidden-channel pruning with a least-squares refit;
or the two projections of an attention block's QK or OV product (``lrcompile.attention.HeadPair``):
``heads``, head-dimension reduction. The planner prices every (form, size) of every site under one budget.
"""
from __future__ import annotations

from .base import LayerForm, Storage, Stored
from .channels import ChannelsForm
from .heads import HeadsForm
from .conv import CONV_FORMS, CPForm, SpatialForm, Tucker2Form
from .lowrank import LowRankForm
from .sparse import DenseNMForm, DictionaryForm, LowRankSparseForm, NMForm


#: name -> form (the registry); the default form of every candidate is ``lowrank``.
FORMS = {f.name: f for f in (LowRankForm(), NMForm(), LowRankSparseForm(), DenseNMForm(), DictionaryForm(),
                             Tucker2Form(), CPForm(), SpatialForm(), ChannelsForm(), HeadsForm())}
DEFAULT = "lowrank"
#: the passes of single weights (a layer form applies to some of them; a pair form to MLP pairs)
LAYER_OPS = ("matmul", "gemm", "conv", "gather")


def layer_form_names() -> tuple[str, ...]:
    """The forms a user may give a weight (``--form``), registration order."""
    return tuple(n for n, f in FORMS.items() if set(f.ops) & set(LAYER_OPS))


def form_for(pass_name: str, name: str = DEFAULT):
    """The form ``name`` if it applies to candidates of pass ``pass_name``; KeyError otherwise."""
    form = FORMS[name]
    if pass_name not in form.ops:
        raise KeyError(f"form {name!r} does not apply to {pass_name} nodes")
    return form


__all__ = ["CONV_FORMS", "DEFAULT", "FORMS", "LAYER_OPS", "layer_form_names", "LayerForm", "Storage", "Stored", "form_for"]

"""The form registry: every layer form answers the whole contract, names only ops that exist,
and exactly one form is priced by default (today's output)."""
from __future__ import annotations

import inspect

from lrcompile.forms import DEFAULT, FORMS, LayerForm
from lrcompile.passes import PASSES


def _contract() -> set[str]:
    return {n for n, v in vars(LayerForm).items() if inspect.isfunction(v) and not n.startswith("_")}


def test_layer_forms_answer_the_whole_contract():
    layer_forms = [f for f in FORMS.values() if set(f.ops) & set(PASSES)]
    assert layer_forms, "no form applies to a pass"
    for form in layer_forms:
        missing = sorted(n for n in _contract() if not callable(getattr(form, n, None)))
        assert not missing, f"form {form.name!r} lacks {missing}"
        assert set(form.ops) <= set(PASSES), f"form {form.name!r} names unknown ops {set(form.ops) - set(PASSES)}"


def test_only_the_default_form_is_priced_without_being_asked():
    assert [f.name for f in FORMS.values() if f.priced_by_default] == [DEFAULT]
    assert all(name == f.name for name, f in FORMS.items())

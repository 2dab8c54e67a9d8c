"""Graph rewrite passes (installed as ``lrcompile.passes``)."""

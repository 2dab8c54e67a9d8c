"""TensorRT plugin sources, one folder per plugin (installed as ``lrcompile.plugins``)."""

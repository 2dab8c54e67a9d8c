"""LowRankGemm for TensorRT through ``tensorrt.plugin`` (Quickly Deployable Plugins).

``register()`` registers ``lrcompile::LowRankGemm`` (the contract's namespace, name and version):

- ``register``: the output's description, ``[..., N]`` with X's leading dims and C's columns;
- ``autotune``: fp32, fp16 and bf16 (all I/O alike, LINEAR), one tactic per tile shape of
  :data:`TACTICS`, so TensorRT times them and keeps the fastest;
- ``aot_impl``: the Triton kernel (``kernel.low_rank_gemm_aot``) compiled to PTX for the chosen
  tactic and dtype, with its launch grid (one program per row block: ``ceil(rows / BLOCK_M)``,
  symbolic in the batch) and the extra scalars ``M, K, R, N``. TensorRT embeds the PTX in the
  engine, which then runs without Python.

With the plugin registered, TensorRT's ONNX parser uses it for the ``lrcompile::LowRankGemm``
calls that ``--plugins`` writes (the calls carry ``plugin_namespace`` / ``plugin_version``;
``parser_flags`` also sets the plugin-override flag where the parser has it) instead of inlining
the function's body.

UNVERIFIED: no machine this was written on has the full ``tensorrt`` package and a GPU; its tests
(``tests/plugins/test_trt_glue.py``) skip unless ``tensorrt.plugin`` imports and a GPU is present.
TensorRT is imported only inside these functions.
"""
from __future__ import annotations

from .contract import CONTRACT

#: tactic id -> (BLOCK_M, BLOCK_N, BLOCK_K, num_warps); BLOCK_R follows the rank.
TACTICS = {1: (16, 64, 32, 4), 2: (32, 64, 32, 4), 3: (64, 64, 32, 4), 4: (64, 128, 32, 8), 5: (128, 64, 32, 8)}
_DTYPES = "FP32|FP16|BF16"
_REGISTERED: list[str] = []


def _triton_type(trt, dtype) -> str:
    return {trt.float32: "fp32", trt.float16: "fp16", trt.bfloat16: "bf16"}[dtype]


def register() -> str:
    """Register the plugin with TensorRT (once per process); returns its id."""
    if CONTRACT.qualified in _REGISTERED:
        return CONTRACT.qualified
    from typing import List, Tuple, Union

    import tensorrt as trt
    import tensorrt.plugin as trtp
    import triton

    from .kernel import low_rank_gemm_aot

    plugin_id = CONTRACT.qualified

    @trtp.register(plugin_id)
    def describe(X: trtp.TensorDesc, A: trtp.TensorDesc, C: trtp.TensorDesc) -> Tuple[trtp.TensorDesc]:
        y = X.like()
        dims = trtp.ShapeExprs(X.ndim)
        for i in range(X.ndim - 1):
            dims[i] = X.shape_expr[i]
        dims[X.ndim - 1] = C.shape_expr[1]
        y.shape_expr = dims
        return (y,)

    @trtp.autotune(plugin_id)
    def tune(X: trtp.TensorDesc, A: trtp.TensorDesc, C: trtp.TensorDesc,
             outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(", ".join([_DTYPES] * 4), "LINEAR", list(TACTICS))]

    @trtp.aot_impl(plugin_id)
    def aot(X: trtp.TensorDesc, A: trtp.TensorDesc, C: trtp.TensorDesc, outputs: Tuple[trtp.TensorDesc],
            tactic: int) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        bm, bn, bk, warps = TACTICS.get(tactic, TACTICS[2])
        k, r = int(A.shape[0]), int(A.shape[1])
        ty = _triton_type(trt, X.dtype)
        src = triton.compiler.ASTSource(
            fn=low_rank_gemm_aot,
            signature={"x_ptr": f"*{ty}", "a_ptr": f"*{ty}", "c_ptr": f"*{ty}", "M": "i32", "K": "i32", "R": "i32",
                       "N": "i32", "y_ptr": f"*{ty}", "BLOCK_M": "constexpr", "BLOCK_K": "constexpr",
                       "BLOCK_N": "constexpr", "BLOCK_R": "constexpr"},
            constexprs={"BLOCK_M": bm, "BLOCK_K": bk, "BLOCK_N": bn,
                        "BLOCK_R": max(16, triton.next_power_of_2(r))})
        compiled = triton.compile(src, options={"num_warps": warps})
        rows = X.shape_expr[0]
        for i in range(1, X.ndim - 1):
            rows = rows * X.shape_expr[i]
        launch = trtp.KernelLaunchParams()
        launch.grid_x = trtp.cdiv(rows, bm)
        launch.block_x = compiled.metadata.num_warps * 32
        launch.shared_mem = compiled.metadata.shared
        extra = trtp.SymIntExprs(4)
        extra[0] = trtp.SymInt32(rows)
        extra[1] = trtp.SymInt32(k)
        extra[2] = trtp.SymInt32(r)
        extra[3] = trtp.SymInt32(C.shape_expr[1])
        return compiled.metadata.name, compiled.asm["ptx"], launch, extra

    _REGISTERED.append(plugin_id)
    return plugin_id


def parser_flags(trt, parser) -> list[str]:
    """Ask ``parser`` to prefer registered plugins over inlining a function (where it can)."""
    flag = getattr(getattr(trt, "OnnxParserFlag", None), "ENABLE_PLUGIN_OVERRIDE", None)
    if flag is None:
        return []
    parser.set_flag(flag)
    return ["ENABLE_PLUGIN_OVERRIDE"]

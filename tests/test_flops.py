"""FLOP and parameter counts checked by hand on small graphs."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from helpers import compile_full, make_model, save, trained_like, vi
from lrcompile.errors import LrcError
from lrcompile.flops import count_flops, param_count


def _w(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_matmul_batched_with_constant_weight():
    b, m, k, n = 2, 3, 4, 5
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                       [vi("x", ["batch", "seq", k])], [vi("y", ["batch", "seq", n])], [("w", _w(k, n))])
    res = count_flops(model, {"x": (b, m, k)})
    assert res["total"] == 2 * b * m * k * n == 240
    assert res["nodes"] == [{"name": "mm", "op": "MatMul", "flops": 240, "params": k * n}]
    assert res["unknown"] == []


def test_matmul_of_two_activations_broadcasts():
    # [2, 1, 3, 4] x [5, 4, 6] broadcasts to [2, 5, 3, 6]: 2*5 products of 3x4 by 4x6
    model = make_model([helper.make_node("MatMul", ["a", "b"], ["y"])],
                       [vi("a", [2, 1, 3, 4]), vi("b", [5, 4, 6])], [vi("y", None)])
    res = count_flops(model, {})
    assert res["total"] == 2 * (2 * 5) * 3 * 4 * 6
    assert res["nodes"][0]["params"] == 0


@pytest.mark.parametrize("trans_a", [0, 1])
def test_gemm_trans_b(trans_a):
    m, k, n = 3, 4, 5
    a_shape = [k, m] if trans_a else [m, k]
    node = helper.make_node("Gemm", ["a", "w", "c"], ["y"], name="g", transA=trans_a, transB=1, alpha=0.5)
    model = make_model([node], [vi("a", ["d0", "d1"])], [vi("y", None)], [("w", _w(n, k)), ("c", _w(n))])
    res = count_flops(model, {"a": tuple(a_shape)})
    assert res["total"] == 2 * m * k * n == 120
    assert res["nodes"][0]["params"] == n * k  # the weight; the bias is not a MAC


def _conv_out(size, k, stride, dilation, pad_total):
    return (size + pad_total - dilation * (k - 1) - 1) // stride + 1


@pytest.mark.parametrize("group,stride,dilation,pads", [(1, 1, 1, 0), (2, 2, 2, 1), (4, 3, 1, 2), (8, 1, 2, 2)])
def test_conv_groups_stride_dilation_padding(group, stride, dilation, pads):
    b, c, h, w, o, kh, kw = 2, 8, 11, 9, 16, 3, 2
    attrs = dict(group=group, strides=[stride, stride], dilations=[dilation, dilation], pads=[pads, pads, pads, pads])
    node = helper.make_node("Conv", ["x", "w", "bias"], ["y"], name="conv", **attrs)
    model = make_model([node], [vi("x", ["n", c, h, w])], [vi("y", None)],
                       [("w", _w(o, c // group, kh, kw)), ("bias", _w(o))])
    res = count_flops(model, {"x": (b, c, h, w)})
    oh, ow = _conv_out(h, kh, stride, dilation, 2 * pads), _conv_out(w, kw, stride, dilation, 2 * pads)
    macs = b * o * oh * ow * (c // group) * kh * kw  # each output: one group's receptive field
    assert res["total"] == 2 * macs
    assert res["nodes"][0]["params"] == o * (c // group) * kh * kw


def test_conv_auto_pad_same_upper():
    node = helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER", strides=[2, 2])
    model = make_model([node], [vi("x", [1, 3, 10, 7])], [vi("y", None)], [("w", _w(4, 3, 3, 3))])
    # SAME: output = ceil(input / stride) = 5 x 4
    assert count_flops(model, {})["total"] == 2 * (4 * 5 * 4) * (3 * 3 * 3)


def test_low_rank_chain_is_2mr_k_plus_n():
    m, k, n, r = 7, 32, 24, 4
    nodes = [helper.make_node("MatMul", ["x", "a"], ["t"]), helper.make_node("MatMul", ["t", "c"], ["y"])]
    chain = make_model(nodes, [vi("x", ["m", k])], [vi("y", ["m", n])], [("a", _w(k, r)), ("c", _w(r, n))])
    dense = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [vi("x", ["m", k])], [vi("y", ["m", n])],
                       [("w", _w(k, n))])
    assert count_flops(chain, {"x": (m, k)})["total"] == 2 * m * r * (k + n)
    assert count_flops(dense, {"x": (m, k)})["total"] == 2 * m * k * n


def test_compiled_chain_counts_its_rank(tmp_path):
    """The chain lrcompile writes for a MatMul counts exactly 2*M*r*(K+N)."""
    m, k, n, r = 5, 64, 48, 8
    src = save(make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [vi("x", ["m", k])], [vi("y", ["m", n])],
                          [("w", trained_like(k, n))]), tmp_path / "mm.onnx")
    res = compile_full(src, tmp_path, rank=r, verify=False)
    import onnx

    out = onnx.load(str(res.output))
    assert count_flops(out, {"x": (m, k)})["total"] == 2 * m * r * (k + n)


def test_gather_is_free_but_its_table_counts():
    model = make_model([helper.make_node("Gather", ["table", "ids"], ["y"], name="emb")],
                       [vi("ids", ["b", "s"], TensorProto.INT64)], [vi("y", None)], [("table", _w(100, 8))])
    res = count_flops(model, {"ids": (2, 3)})
    assert res["total"] == 0
    assert res["nodes"] == [{"name": "emb", "op": "Gather", "flops": 0, "params": 800}]


def test_params_count_each_tensor_once_and_floats_apart():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["t"]), helper.make_node("MatMul", ["t", "w"], ["u"]),
             helper.make_node("Reshape", ["u", "shape"], ["y"])]
    inits = [("w", _w(6, 6)), ("shape", np.array([-1], np.int64))]
    model = make_model(nodes, [vi("x", [2, 6])], [vi("y", None)], inits)
    assert param_count(model) == {"float": 36, "all": 37}
    assert count_flops(model, {})["total"] == 2 * (2 * 2 * 6 * 6)


def test_dynamic_input_needs_a_shape():
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [vi("x", ["m", 4])], [vi("y", None)],
                       [("w", _w(4, 5))])
    with pytest.raises(LrcError, match="dynamic dims"):
        count_flops(model, {})
    with pytest.raises(LrcError, match="has 2 dims"):
        count_flops(model, {"x": (1, 2, 4)})

"""ONNX write-back of quantization: a QDQ model (QuantizeLinear / DequantizeLinear) ORT runs.

:func:`write_qdq` rewrites a copy of the model, with onnx-graphsurgeon, for each quantized weight
(an initializer, keyed like ``PruneGraph.quant``):

    W (float)                        W_q (int8 initializer), scale (per axis), zero point 0
      |                    ->          |
    MatMul/Gemm/Conv                 DequantizeLinear(axis) -> MatMul/Gemm/Conv

and for each quantized layer input ``x`` (W8A8):

- ``w8a8_static``: ``Clip(x, -127 s, 127 s) -> QuantizeLinear(s, 0) -> DequantizeLinear``.
  The Clip keeps the symmetric range ``[-127, 127]`` (QuantizeLinear saturates at -128), so the
  result matches :func:`graphprune.ir.quant.fake_quantize_act` exactly.
- ``w8a8_dynamic``: per-token scales computed in the graph,
  ``s = ReduceMax(|x|, last axis) / 127``, then ``Clip(Round(x / s), -127, 127) * s`` in float.
  ONNX's DynamicQuantizeLinear is per tensor and asymmetric (uint8): not the scheme codegen runs,
  so the pattern spells out the per-token symmetric one (convs: one scale per tensor).

Several layers reading one tensor with one scale (or both dynamic) share one Q/DQ pattern. Zero
weights quantize to 0: a sparse initializer stays as sparse. :func:`tensor_values` runs the model with
chosen intermediate tensors as extra outputs (calibration of an ONNX model's layer inputs).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphprune.ir.errors import ConfigError
from graphprune.ir.quant import QMAX, QuantSpec, quantize_weight

__all__ = ["tensor_values", "write_qdq"]


def _weight_dq(graph: gs.Graph, name: str, w: gs.Constant, spec: QuantSpec) -> gs.Variable:
    q = quantize_weight(w.values, spec)
    scale = np.asarray(spec.weight_scale, np.float32)
    zp = np.zeros(scale.shape, np.int8)
    out = gs.Variable(f"{name}_dequantized", dtype=np.float32, shape=list(w.shape))
    graph.nodes.append(gs.Node(
        "DequantizeLinear", f"{name}_DequantizeLinear",
        attrs={"axis": spec.axis % q.ndim},
        inputs=[gs.Constant(f"{name}_quantized", q), gs.Constant(f"{name}_scale", scale),
                gs.Constant(f"{name}_zero_point", zp)],
        outputs=[out]))  # fmt: skip
    return out


def _static_qdq(graph: gs.Graph, x: gs.Variable, s: float) -> gs.Variable:
    tag = f"{x.name}_qdq"
    sc = np.float32(s)
    lo, hi = gs.Constant(f"{tag}_lo", np.array(-QMAX * sc, np.float32)), gs.Constant(
        f"{tag}_hi", np.array(QMAX * sc, np.float32))
    clipped = gs.Variable(f"{tag}_clipped", dtype=np.float32)
    q = gs.Variable(f"{tag}_quantized", dtype=np.int8)
    out = gs.Variable(f"{tag}_dequantized", dtype=np.float32)
    scale = gs.Constant(f"{tag}_scale", np.array(sc, np.float32))
    zp = gs.Constant(f"{tag}_zero_point", np.array(0, np.int8))
    graph.nodes += [
        gs.Node("Clip", f"{tag}_Clip", inputs=[x, lo, hi], outputs=[clipped]),
        gs.Node("QuantizeLinear", f"{tag}_QuantizeLinear", inputs=[clipped, scale, zp],
                outputs=[q]),
        gs.Node("DequantizeLinear", f"{tag}_DequantizeLinear", inputs=[q, scale, zp],
                outputs=[out]),
    ]  # fmt: skip
    return out


def _dynamic_fq(graph: gs.Graph, x: gs.Variable, per_token: bool) -> gs.Variable:
    tag = f"{x.name}_dynq{'' if per_token else '_tensor'}"

    def var(n: str) -> gs.Variable:
        return gs.Variable(f"{tag}_{n}", dtype=np.float32)

    def const(n: str, v: Any) -> gs.Constant:
        return gs.Constant(f"{tag}_{n}", np.array(v, np.float32))

    absx, amax, s, r, c, out = (var(n) for n in ("abs", "amax", "scale", "round", "clip", "fq"))
    xs = var("div")
    attrs = {"keepdims": 1}
    reduce_in = [absx]
    if per_token:
        reduce_in.append(gs.Constant(f"{tag}_axes", np.array([-1], np.int64)))
    graph.nodes += [
        gs.Node("Abs", f"{tag}_Abs", inputs=[x], outputs=[absx]),
        gs.Node("ReduceMax", f"{tag}_ReduceMax", attrs=attrs, inputs=reduce_in, outputs=[amax]),
        gs.Node("Max", f"{tag}_Floor", inputs=[amax, const("tiny", 1e-30)], outputs=[c]),
        gs.Node("Div", f"{tag}_Scale", inputs=[c, const("qmax", QMAX)], outputs=[s]),
        gs.Node("Div", f"{tag}_Div", inputs=[x, s], outputs=[xs]),
        gs.Node("Round", f"{tag}_Round", inputs=[xs], outputs=[r]),
        gs.Node("Clip", f"{tag}_Clip", inputs=[r, const("lo", -QMAX), const("hi", QMAX)],
                outputs=[var("q")]),
    ]  # fmt: skip
    graph.nodes.append(gs.Node("Mul", f"{tag}_Mul", inputs=[graph.nodes[-1].outputs[0], s],
                               outputs=[out]))  # fmt: skip
    return out


def write_qdq(model: onnx.ModelProto, specs: Mapping[str, QuantSpec],
              inputs: Mapping[str, list[tuple[str, int, bool]]]) -> onnx.ModelProto:
    """A QDQ copy of ``model``: ``specs`` by weight initializer; ``inputs`` by the same names,
    the uses to fake-quantize the input of: ``(node name, input slot, per_token)``.

    Examples
    --------
    >>> from onnx import helper, TensorProto, numpy_helper
    >>> w = numpy_helper.from_array(np.array([[1.0, 0.0], [0.0, -2.0]], np.float32), "W")
    >>> g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
    ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
    ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [w])
    >>> spec = QuantSpec("w8", np.array([1 / 127, 2 / 127], np.float32), 1)
    >>> out = write_qdq(helper.make_model(g), {"W": spec}, {})
    >>> [n.op_type for n in out.graph.node]
    ['DequantizeLinear', 'MatMul']
    """
    graph = gs.import_onnx(model)
    consts = graph.tensors()
    missing = [k for k in specs if not isinstance(consts.get(k), gs.Constant)]
    if missing:
        raise ConfigError(f"quantization names weights the ONNX model has no initializer for: "
                          f"{missing[:3]}")  # fmt: skip
    nodes = {n.name: n for n in graph.nodes}
    done: dict[tuple[str, float | bool], gs.Variable] = {}  # one Q/DQ per input and scale
    for name, spec in specs.items():
        w = consts[name]
        dq = _weight_dq(graph, name, w, spec)
        for node in list(w.outputs):
            for i, t in enumerate(list(node.inputs)):
                if t is w:
                    node.inputs[i] = dq
        if spec.scheme == "w8":
            continue
        for node_name, slot, per_token in inputs.get(name, []):
            node = nodes[node_name]
            x = node.inputs[slot]
            static = spec.scheme == "w8a8_static"
            key = (x.name, float(spec.act_scale) if static else per_token)
            if key not in done:
                done[key] = (_static_qdq(graph, x, float(spec.act_scale)) if static
                             else _dynamic_fq(graph, x, per_token))  # fmt: skip
            node.inputs[slot] = done[key]
    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    # QuantizeLinear/DequantizeLinear with per-axis scales need opset >= 13; ReduceMax with axes
    # as an input, 18. Keep the model's domain imports, raising the default domain's version.
    default = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    opset = max([18, *default])
    del out.opset_import[:]
    out.opset_import.extend([o for o in model.opset_import if o.domain not in ("", "ai.onnx")])
    out.opset_import.append(onnx.helper.make_opsetid("", opset))
    out.ir_version = max(model.ir_version, 8)
    return out


def tensor_values(model: onnx.ModelProto, names: list[str],
                  batches: list[Any]) -> Iterator[dict[str, np.ndarray]]:  # fmt: skip
    """For each batch (a dict by input name, a sequence by position, or one array), the values
    of the tensors ``names`` (intermediate or not) as the model computes them."""
    from graphprune.frontends.onnx.session import feeds_for, ort_session

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in have)
    sess = ort_session(probe, optimize=False)
    for b in batches:
        if not isinstance(b, (Mapping, list, tuple)):
            b = [b]
        if isinstance(b, Mapping):
            b = {k: np.asarray(v) for k, v in b.items()}
        else:
            b = [np.asarray(v) for v in b]
        vals = sess.run(names, feeds_for(sess, b))
        yield dict(zip(names, vals))

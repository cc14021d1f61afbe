"""TVM codegen: lower a (pruned, sparsified) model to Relax, schedule it, emit a deployable artifact.

Layer 4 of graphprune. It may import the IR (:mod:`graphprune.ir`), the artifact loader
(:mod:`graphprune.runtime`) and, to tell a torch model from an ONNX one, only
:func:`graphprune.frontends.kind_of`; never the frontends' internals, the passes, the API or the
application. It reads the model it is given and, when given one, the masks of its IR.

Stages, in order (:func:`compile` chains them, :mod:`.compiler`):

* :mod:`.lower` — torch.export / ONNX to a Relax ``main(*inputs, *weights)``;
* :mod:`.masks` — the IR's sparsity masks checked and applied to the lowered weights;
* :mod:`.sparse_rewrite` — sparse Linears and convs to our kernels (:mod:`.kernels`);
* :mod:`.build` — Relax rewrites (:mod:`.rewrites`, :mod:`.pad_channels`), build-time weight
  transforms (:mod:`.lifted_weights`), our CPU schedule rules (:mod:`.cpu_rules`, optionally
  MetaSchedule, :mod:`.tuning`), ``tvm.compile``;
* :mod:`.artifact` — the artifact directory, read back by :func:`graphprune.runtime.load` or,
  without graphprune, by the snippet in ``codegen/README_SNIPPET.md``.

TVM's private APIs are used only through :mod:`.tvm_compat`. :mod:`.experimental` holds code
that has never run on hardware. TVM is imported lazily, so importing this package is cheap.
"""

from __future__ import annotations

__all__ = ["compile"]


def compile(*args, **kwargs):  # noqa: A001
    from graphprune.codegen.compiler import compile as _compile

    return _compile(*args, **kwargs)


compile.__doc__ = "See :func:`graphprune.codegen.compiler.compile`."

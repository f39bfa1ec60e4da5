"""EinsumDense: the einsum written as a batched matrix product, then the Dense rule's
ghost norm or per-example products (whichever is cheaper for the shapes).

``z = einsum(equation, a, W) + bias``. Every kernel axis is either contracted with an
input axis (``I``) or carried to the output (``O``); input axes that reach the output
without touching the kernel are positions (``P``, summed in each example's gradient);
input-only axes are summed away first. So ``a`` becomes ``[B, P, I]``, ``dz``
``[B, P, O]``, and example ``b``'s kernel gradient is ``sum_p a[b, p] (outer) dz[b, p]``
reshaped to the kernel's axes. The bias gradient is ``dz`` summed over the axes the bias
is broadcast along.
"""
from __future__ import annotations

import dataclasses
import math
import re
import string
from typing import Dict

from keras_coherence._keras import keras, tf
from keras_coherence.coherence.registry import (
    LayerGrads, LayerRule, NotSupported, Trace, apply_activation, reduce_sq, register,
    var_key,
)
from keras_coherence.coherence.rules.dense import positions_matmul_grads

_EQUATION = re.compile(r"^([a-zA-Z.]+),([a-zA-Z.]+)->([a-zA-Z.]+)$")


@dataclasses.dataclass(frozen=True)
class EinsumLayout:
    """The axes of ``inputs,kernel->output`` (no ellipsis) sorted into batch ``b``,
    positions ``P``, contracted ``I`` and output ``O`` kernel axes."""

    inputs: str
    kernel: str
    output: str

    @property
    def batch(self) -> str:
        return self.inputs[0]

    @property
    def contracted(self) -> str:
        return "".join(c for c in self.kernel if c in self.inputs)

    @property
    def produced(self) -> str:
        return "".join(c for c in self.kernel if c in self.output)

    @property
    def positions(self) -> str:
        return "".join(c for c in self.inputs[1:] if c in self.output and c not in self.kernel)

    @classmethod
    def parse(cls, equation: str, input_rank: int = None) -> "EinsumLayout":
        """Raises :class:`NotSupported` when the equation is not a batched matrix product
        with the batch as the first input and output axis. ``input_rank`` expands an
        ellipsis into that many axes (None: one axis, enough to check the equation)."""
        match = _EQUATION.match(equation.replace(" ", ""))
        if not match:
            raise NotSupported(f"equation {equation!r} is not of the form 'in,kernel->out'")
        inputs, kernel, output = match.groups()
        if "..." in kernel:
            raise NotSupported(f"equation {equation!r} has an ellipsis in the kernel")
        if "..." in inputs or "..." in output:
            if input_rank is None:  # one axis for the ellipsis: the same verdict as any number
                input_rank = len(inputs) - 3 + 1
            spare = [c for c in string.ascii_letters if c not in equation]
            fill = "".join(spare[: input_rank - (len(inputs) - 3)])
            inputs, output = inputs.replace("...", fill), output.replace("...", fill)
        layout = cls(inputs, kernel, output)
        if output[:1] != inputs[:1] or inputs[:1] in kernel:
            raise NotSupported(f"equation {equation!r}: the first input axis (the examples) must "
                               "be the first output axis and not a kernel axis")
        for c in kernel:
            if (c in inputs) == (c in output):
                raise NotSupported(f"equation {equation!r}: kernel axis {c!r} must be in exactly one "
                                   "of the input and the output")
        if len(set(inputs)) != len(inputs) or len(set(output)) != len(output):
            raise NotSupported(f"equation {equation!r} repeats an axis (a diagonal)")
        return layout


def _matrix_form(layout: EinsumLayout, a, dz):
    """``a`` as ``[B, P, I]`` and ``dz`` as ``[B, P, O]`` (axes flattened in layout order)."""
    b, p = layout.batch, layout.positions
    a3 = tf.einsum(f"{layout.inputs}->{b}{p}{layout.contracted}", a)
    dz3 = tf.einsum(f"{layout.output}->{b}{p}{layout.produced}", dz)
    n_in = math.prod(int(d) for d in a3.shape[1 + len(p):])
    n_out = math.prod(int(d) for d in dz3.shape[1 + len(p):])
    batch = tf.shape(a)[0]
    return tf.reshape(a3, [batch, -1, n_in]), tf.reshape(dz3, [batch, -1, n_out])


def _to_kernel(layout: EinsumLayout, g, kernel_shape, per_example: bool):
    """A ``[I, O]`` (or ``[B, I, O]``) gradient reshaped to the kernel's axis order."""
    dims = dict(zip(layout.kernel, kernel_shape))
    io = layout.contracted + layout.produced
    shape = [dims[c] for c in io]
    if per_example:
        g = tf.reshape(g, [tf.shape(g)[0]] + shape)
        return tf.einsum(f"{layout.batch}{io}->{layout.batch}{layout.kernel}", g)
    return tf.einsum(f"{io}->{layout.kernel}", tf.reshape(g, shape))


def _bias_per_example(dz, bias_shape):
    """``dz`` ``[B, ...]`` summed over the axes a bias of ``bias_shape`` (aligned with the
    trailing output axes, 1 where it broadcasts) is broadcast along: ``[B, *bias_shape]``."""
    rank, bias_rank = dz.shape.rank, len(bias_shape)
    lead = list(range(1, rank - bias_rank))
    if lead:
        dz = tf.reduce_sum(dz, lead)
    ones = [1 + i for i, d in enumerate(bias_shape) if int(d) == 1]
    if ones:
        dz = tf.reduce_sum(dz, ones, keepdims=True)
    return dz


@register
class EinsumDenseRule(LayerRule):
    layer_types = (keras.layers.EinsumDense,)

    def check(self, layer):
        if layer.activity_regularizer is not None:
            raise NotSupported("activity_regularizer is set")
        EinsumLayout.parse(layer.equation)

    def forward(self, layer, args, kwargs, mode):
        x = tf.cast(args[0], layer.compute_dtype)
        layout = EinsumLayout.parse(layer.equation, x.shape.rank)
        z = tf.einsum(layer.equation, x, layer.kernel)
        if layer.bias is not None:
            z = z + layer.bias
        return apply_activation(layer, z), Trace(layer, self, [z], {"a": x}, {"layout": layout})

    def backward(self, trace, cotangents):
        layer, layout = trace.layer, trace.static["layout"]
        dz = cotangents[0]
        a3, dz3 = _matrix_form(layout, trace.context["a"], dz)
        kernel_sum, sq = positions_matmul_grads(a3, dz3)
        grads = {var_key(layer.kernel): _to_kernel(layout, kernel_sum, layer.kernel.shape, False)}
        if layer.bias is not None:
            db = _bias_per_example(dz, layer.bias.shape)
            grads[var_key(layer.bias)] = tf.reshape(tf.reduce_sum(db, 0), layer.bias.shape)
            sq = sq + reduce_sq(db)
        return LayerGrads(grads, sq)

    def per_example_grads(self, trace, cotangents) -> Dict[int, tf.Tensor]:
        layer, layout = trace.layer, trace.static["layout"]
        dz = cotangents[0]
        a3, dz3 = _matrix_form(layout, trace.context["a"], dz)
        kernel = tf.matmul(a3, dz3, transpose_a=True)  # [B, I, O]
        grads = {var_key(layer.kernel): _to_kernel(layout, kernel, layer.kernel.shape, True)}
        if layer.bias is not None:
            db = _bias_per_example(dz, layer.bias.shape)
            grads[var_key(layer.bias)] = tf.reshape(db, [-1] + list(layer.bias.shape))
        return grads

"""Per-layer-type rules for per-example gradient quantities, in one registry.

A *rule* knows, for one layer type, how to

1. run the layer's forward pass so that the tensors it needs are exposed
   (``forward``): typically the layer input ``a`` and the pre-activation output ``z``
   (``z`` is *watched*: the engine differentiates the loss with respect to it);
2. turn the cotangents ``dL/dz`` of one backward pass into the batch-summed parameter
   gradients and the per-example squared gradient norms of the layer
   (``backward``) -- the "ghost norm" trick: no per-example gradient of the whole model
   is ever materialized.

Adding a layer type is one small file in ``rules/`` that subclasses :class:`LayerRule`
and decorates it with :func:`register`. A layer with trainable weights and no rule
takes the generic fallback (``rules/fallback.py``), with a one-time warning.
"""
from __future__ import annotations

import dataclasses
import warnings
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type

from keras_coherence._keras import tf
from keras_coherence._registry import Registry

#: The rule instance of each layer type (:func:`register` adds to it, :func:`rule_for` reads it).
RULES = Registry("rule", taken="{key_name} already has the rule {existing}; registering {new} for it too would "
                 "silently replace it. Use @register(replace=True) to override it on purpose.")
_WARNED: "weakref.WeakSet" = weakref.WeakSet()  # layers, not ids: an id is reused


def var_key(variable) -> int:
    """A stable key for a variable (larq's QuantizedVariable wraps a latent one)."""
    return id(getattr(variable, "latent_variable", variable))


@dataclasses.dataclass
class Trace:
    """What a rule's forward pass leaves for its backward pass."""

    layer: Any
    rule: "LayerRule"
    watched: List[tf.Tensor]  # tensors the engine differentiates the loss against
    context: Dict[str, Any]  # batched tensors the backward needs (leading axis: examples)
    static: Dict[str, Any] = dataclasses.field(default_factory=dict)  # everything else


@dataclasses.dataclass
class LayerGrads:
    """Backward result for one traced layer call.

    ``sum_grads`` maps :func:`var_key` of each trainable weight to the gradient summed
    over the batch; ``sq_norms`` is the per-example squared norm ``[batch]`` of the
    gradient with respect to all the layer's trainable weights.
    """

    sum_grads: Dict[int, Any]
    sq_norms: tf.Tensor


class NotSupported(Exception):
    """Raised by ``LayerRule.check`` when a layer's configuration is outside a rule."""


class LayerRule:
    """Base class of per-layer-type rules. Subclasses set ``layer_types``: classes, or the
    dotted name of a class (``"larq.layers.QuantDense"``) for a layer from a package
    that should load only when a model uses it."""

    layer_types: Tuple[type, ...] = ()

    def check(self, layer) -> None:
        """Raise :class:`NotSupported` (with the reason) if the rule cannot handle
        this layer's configuration; the layer then takes the generic fallback."""

    def forward(self, layer, args: Sequence, kwargs: Dict, mode: str) -> Tuple[Any, Trace]:
        raise NotImplementedError

    def backward(self, trace: Trace, cotangents: List[tf.Tensor]) -> LayerGrads:
        """Batch-summed gradients and per-example squared norms. The default derives
        them from :meth:`per_example_grads`; rules with a cheaper "ghost" form (Dense,
        convolutions, Embedding) override it."""
        per_example = self.per_example_grads(trace, cotangents)
        grads = {key: tf.reduce_sum(g, 0) for key, g in per_example.items()}
        sq = tf.add_n([reduce_sq(g) for g in per_example.values()])
        return LayerGrads(grads, sq)

    def per_example_grads(self, trace: Trace, cotangents: List[tf.Tensor]) -> Dict[int, tf.Tensor]:
        """Explicit per-example gradients ``{var_key: [B, *var.shape]}`` of the layer's
        trainable weights, for aggregators that need every example's value of every
        coordinate (winsorization). Memory: batch x layer parameters."""
        raise NotImplementedError


def register(rule_cls: Type[LayerRule] = None, *, replace: bool = False):
    """Class decorator: register ``rule_cls`` for each type in its ``layer_types``.

    A layer type that already has a rule raises ``ValueError``, naming both rules; to
    override a rule on purpose, decorate with ``@register(replace=True)``."""
    if rule_cls is None:
        return lambda cls: register(cls, replace=replace)
    RULES.add(rule_cls(), *rule_cls.layer_types, replace=replace)
    return rule_cls


def rule_for(layer) -> Tuple[Optional[LayerRule], str]:
    """The rule for ``layer`` and, when there is none, why.

    Only exact registered types match, or subclasses that inherit ``call`` unchanged
    from a registered type: a subclass that overrides ``call`` computes something the
    rule does not know about, so it takes the fallback (never a wrong number).
    """
    for klass in type(layer).__mro__:
        rule = RULES.get(klass) or RULES.get(f"{klass.__module__}.{klass.__qualname__}")
        if rule is None:
            continue
        if klass is not type(layer) and type(layer).call is not klass.call:
            return None, f"{type(layer).__name__} overrides call() of {klass.__name__}"
        try:
            rule.check(layer)
        except NotSupported as err:
            return None, str(err)
        return rule, ""
    return None, f"no rule is registered for {type(layer).__name__}"


def warn_fallback(layer, reason: str) -> None:
    """One warning per layer instance that takes the generic fallback."""
    if layer in _WARNED:
        return
    _WARNED.add(layer)
    warnings.warn(
        f"keras_coherence: layer {layer.name!r} ({type(layer).__name__}) takes the generic "
        f"per-example-gradient fallback ({reason}); it is exact but slower. Register a rule "
        "with keras_coherence.coherence.registry.register to make it fast.",
        stacklevel=3,
    )


def apply_activation(layer, z):
    activation = getattr(layer, "activation", None)
    return z if activation is None else activation(z)


def reduce_sq(t: tf.Tensor) -> tf.Tensor:
    """Per-example squared norm of a ``[batch, ...]`` tensor."""
    t = tf.reshape(t, [tf.shape(t)[0], -1])
    return tf.reduce_sum(tf.square(t), axis=1)

"""Which low-memory training techniques a binary network uses.

Wang et al., "Enabling Binary Neural Network Training on the Edge" (arXiv 2102.04270)
cut the memory of binary-network training with five independent techniques. Each one
is a field of :class:`LowMemoryConfig`, so it can be switched off for an ablation:

* ``binary_activation_retention`` -- a binary layer keeps only the signs of its input
  (plus the 1-bit STE mask ``|x| <= 1``) for the backward pass, packed 32 per int32 word
  (:func:`~keras_coherence.binary.ops.pack_bits`), instead of the float32 input.
* ``l1_batchnorm`` -- batch norm normalizes by the mean absolute deviation, and its
  backward pass needs only ``sign(x_hat)`` and one scalar per channel.
* ``binarize_weight_grads`` -- the kernel gradient becomes ``sign(dW) / sqrt(N)``,
  ``N`` the kernel's number of elements.
* ``activation_grad`` -- activation gradients are rounded to ``"float16"``, to a
  power of two with a 4-bit exponent (``"po2"``), or kept (``"float32"``).
* ``latent_weights`` -- latent weights (and batch-norm statistics and beta) are rounded
  to ``"float16"`` before use, and so are their gradients; or kept ``"float32"``.

``method`` arguments everywhere in :mod:`keras_coherence.binary` accept
``"standard"`` (Courbariaux & Bengio: plain larq layers, float latent weights, STE,
standard batch norm), ``"low_memory"`` (every technique on, the paper's final
configuration), ``"low_memory_po2"`` (the same with PO2 activation gradients),
``"standard_device"`` (every technique off, :meth:`LowMemoryConfig.standard_device`), a
:class:`LowMemoryConfig`, or its ``get_config()`` dict.

``"standard_device"`` is the standard method's arithmetic (float32 saved activations,
standard batch norm with gamma and beta, float kernel gradients, float32 activation
gradients and latent weights) built from the layers of
:mod:`keras_coherence.binary.layers`, whose backward passes are hand-written from
TFLite builtins: the baseline that, unlike ``"standard"`` (larq and Keras layers, whose
autodiff needs ``Conv2DBackpropFilter``, ``FusedBatchNormGradV3``, ``MaxPoolGrad``),
exports for on-device training with
:mod:`keras_coherence.binary.export_training`.

>>> LowMemoryConfig(activation_grad="po2").activation_grad
'po2'
>>> resolve_method("standard") is None
True
>>> resolve_method("low_memory") == LowMemoryConfig()
True
>>> resolve_method("standard_device") == LowMemoryConfig.standard_device() == STANDARD_DEVICE
True
>>> STANDARD_DEVICE.l1_batchnorm, STANDARD_DEVICE.activation_grad
(False, 'float32')
>>> LowMemoryConfig(latent_weights="int8")
Traceback (most recent call last):
...
ValueError: latent_weights='int8' must be one of 'float32', 'float16'.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Optional, Union

__all__ = ["LowMemoryConfig", "resolve_method", "method_name", "METHODS", "STANDARD_DEVICE",
           "ACTIVATION_GRAD_MODES", "LATENT_WEIGHT_MODES"]

ACTIVATION_GRAD_MODES = ("float32", "float16", "po2")
LATENT_WEIGHT_MODES = ("float32", "float16")


@dataclasses.dataclass(frozen=True)
class LowMemoryConfig:
    """Switches of the low-memory training method (defaults: the paper's final method).

    Args:
        binary_activation_retention: store only sign bits (and STE-mask bits) of binary
            layer inputs for the backward pass.
        l1_batchnorm: use :class:`~keras_coherence.binary.layers.L1BatchNormalization`
            after binary layers instead of standard batch norm.
        binarize_weight_grads: kernel gradients ``sign(dW) / sqrt(N)``.
        activation_grad: ``"float16"``, ``"po2"`` or ``"float32"`` activation gradients.
        latent_weights: ``"float16"`` or ``"float32"`` latent weights.
        po2_exponent_bits: exponent width of PO2 gradients (4 in the paper: 16 levels
            ``2**-8 .. 2**7`` after the per-tensor shift).
        po2_bias: per-tensor shift ``b = bias - round(log2(max|g|))`` (8 in the paper).
    """

    binary_activation_retention: bool = True
    l1_batchnorm: bool = True
    binarize_weight_grads: bool = True
    activation_grad: str = "float16"
    latent_weights: str = "float16"
    po2_exponent_bits: int = 4
    po2_bias: int = 8

    def __post_init__(self):
        for field in ("binary_activation_retention", "l1_batchnorm", "binarize_weight_grads"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"{field}={getattr(self, field)!r} must be True or False.")
        _check_choice("activation_grad", self.activation_grad, ACTIVATION_GRAD_MODES)
        _check_choice("latent_weights", self.latent_weights, LATENT_WEIGHT_MODES)
        bits = self.po2_exponent_bits
        if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not 1 <= bits <= 8:
            raise ValueError(f"po2_exponent_bits={bits!r} must be an integer in 1..8.")
        if isinstance(self.po2_bias, bool) or not isinstance(self.po2_bias, numbers.Integral):
            raise ValueError(f"po2_bias={self.po2_bias!r} must be an integer.")

    @property
    def po2_exponent_range(self):
        """``(lowest, highest)`` exponent of a PO2 gradient after the per-tensor shift."""
        half = 2 ** (self.po2_exponent_bits - 1)
        return -half, half - 1

    @classmethod
    def standard_device(cls) -> "LowMemoryConfig":
        """Every technique off: the standard method's arithmetic in layers whose backward
        passes lower to TFLite builtins (the ``"standard_device"`` preset)."""
        return cls(binary_activation_retention=False, l1_batchnorm=False,
                   binarize_weight_grads=False, activation_grad="float32",
                   latent_weights="float32")

    @property
    def all_off(self) -> bool:
        """True when no technique is on (the ``"standard_device"`` arithmetic)."""
        return (not self.binary_activation_retention and not self.l1_batchnorm
                and not self.binarize_weight_grads and self.activation_grad == "float32"
                and self.latent_weights == "float32")

    def get_config(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_config(cls, config: dict) -> "LowMemoryConfig":
        unknown = set(config) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"Unknown LowMemoryConfig fields: {sorted(unknown)}.")
        return cls(**config)


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(
            f"{name}={value!r} must be one of {', '.join(repr(c) for c in choices)}."
        )


#: The ``"standard_device"`` preset: every low-memory technique off.
STANDARD_DEVICE = LowMemoryConfig.standard_device()

_NAMED = {
    "standard": None,
    "low_memory": LowMemoryConfig(),
    "low_memory_po2": LowMemoryConfig(activation_grad="po2"),
    "standard_device": STANDARD_DEVICE,
}
_ALIASES = {"low-memory": "low_memory", "lowmem": "low_memory", "low-memory-po2": "low_memory_po2",
            "vanilla": "standard", "standard-device": "standard_device"}

#: Method names accepted by ``resolve_method``.
METHODS = tuple(_NAMED)

MethodLike = Union[str, LowMemoryConfig, dict, None]


def resolve_method(method: MethodLike) -> Optional[LowMemoryConfig]:
    """``None`` for standard training, else the :class:`LowMemoryConfig` to use.

    Raises:
        ValueError: an unknown method name or a bad config.
    """
    if isinstance(method, LowMemoryConfig):
        return method
    if isinstance(method, dict):
        return LowMemoryConfig.from_config(method)
    if isinstance(method, str):
        key = method.strip().lower()
        key = _ALIASES.get(key, key)
        if key in _NAMED:
            return _NAMED[key]
    raise ValueError(
        f"Unknown training method {method!r}: use one of {', '.join(METHODS)}, "
        "a LowMemoryConfig or its get_config() dict."
    )


def method_name(method: MethodLike) -> str:
    """A short label: ``"standard"``, a preset name, or ``"low_memory(custom)"``."""
    config = resolve_method(method)
    for name, preset in _NAMED.items():
        if preset == config:
            return name
    return "low_memory(custom)"

"""Training-memory model of binary networks, standard vs low-memory, per layer, in bits.

A reconstruction of §5.4 of Wang et al. (arXiv 2102.04270; the paper's exact equation is
not public). For each layer and a batch of ``B`` examples:

* ``latent_weights`` -- trainable parameters x ``b_W`` (32; 16 for binary layers and
  their l1 batch norms with float16 latent weights);
* ``weight_gradients`` -- the same count x ``b_dW`` (32; 1 for binarized kernel
  gradients; ``b_W`` for beta);
* ``optimizer_slots`` -- slots per weight (Adam 2, Bop 1 on binary kernels, SGD 0)
  x ``optimizer_bits`` (32 unless given: what a Keras optimizer holds);
* ``statistics`` -- non-trainable state (moving mean/variance): ``b_W`` bits each;
* ``saved_activations`` -- what the layer keeps for its backward pass:
  standard: its float32 input (batch norm: its input plus the batch mean and inverse
  deviation); low-memory binary layer with retention: 1 sign bit + 1 STE-mask bit per
  input element (a first layer keeps its real float32 input); l1 batch norm: 1 bit of
  ``sign(x_hat)`` per element plus ``sigma`` and ``s`` per channel; max pooling: a Keras
  ``MaxPooling2D`` (autodiff's ``MaxPoolGrad``) its float32 input, a
  :class:`~keras_coherence.binary.layers.LowMemoryMaxPooling2D` the argmax index,
  ``ceil(log2(pool area))`` bits per output; ReLU its output; average pooling, global
  average pooling and ``Add`` nothing (constant derivatives: the backward needs only
  shapes); reshapes nothing;
* ``gradient_buffers`` -- the transient input and output gradients of the layer's
  backward, ``B x (N_in + N_out) x b_dX`` (32; 16 for float16; 1 + exponent bits for PO2)
  for every layer that computes one (``Add``: its output gradient and the one it hands to
  its inputs, ``N_in`` of one input; reshapes and the input layer: none). They are not
  summed: the peak adds only the largest.

``peak = sum(persistent columns over layers) + max(gradient_buffers)``.

Real (non-binary) layers -- ResNetE-18's stem, shortcuts and head -- are float32 in both
methods. The method is a property of the model's layers: ``memory_profile`` of a built model
reads it from them, and refuses a ``method`` that contradicts them (a standard larq model
profiled as low-memory, or the reverse) rather than mixing both in one table. The TensorFlow emulation in :mod:`keras_coherence.binary.layers` holds float16
values in float32 variables and bits in ``bool`` tensors (8 bits each); this table is what
a device implementation of the method stores.

>>> profile = memory_profile("mlp", batch_size=100, method="standard")
>>> profile.rows[2].layer, profile.rows[2].weights
('fc_1', 200704)
>>> round(memory_ratio("mlp", 100), 2)
1.73
"""
from __future__ import annotations

import dataclasses
import math
from typing import List, Optional

from keras_coherence._keras import keras
from keras_coherence.binary import layers as bl
from keras_coherence.binary.config import LowMemoryConfig, method_name, resolve_method
from keras_coherence.binary.training import optimizer_slots

__all__ = ["MemoryRow", "MemoryProfile", "memory_profile", "memory_ratio", "COLUMNS"]

#: The bit columns of a :class:`MemoryRow`, in table order.
COLUMNS = ("latent_weights", "weight_gradients", "optimizer_slots", "statistics",
           "saved_activations", "gradient_buffers")
_PERSISTENT = COLUMNS[:-1]


@dataclasses.dataclass
class MemoryRow:
    """One layer's training memory in bits (``weights`` is a count)."""

    layer: str
    kind: str
    weights: int = 0
    latent_weights: int = 0
    weight_gradients: int = 0
    optimizer_slots: int = 0
    statistics: int = 0
    saved_activations: int = 0
    gradient_buffers: int = 0

    @property
    def persistent(self) -> int:
        """Bits held through the step (everything but the transient gradient buffers)."""
        return sum(getattr(self, c) for c in _PERSISTENT)


@dataclasses.dataclass
class MemoryProfile:
    """Per-layer rows plus totals; ``str()`` is a text table in KiB."""

    rows: List[MemoryRow]
    batch_size: int
    method: str
    optimizer: str
    model: str

    def totals(self) -> dict:
        """Column sums in bits (``gradient_buffers``: the largest layer's), and ``peak``."""
        out = {c: sum(getattr(r, c) for r in self.rows) for c in _PERSISTENT}
        out["gradient_buffers"] = max((r.gradient_buffers for r in self.rows), default=0)
        out["peak"] = sum(out.values())
        return out

    @property
    def peak_bits(self) -> int:
        return self.totals()["peak"]

    @property
    def peak_mib(self) -> float:
        return self.peak_bits / 8 / 2 ** 20

    def as_dict(self) -> dict:
        return {"model": self.model, "method": self.method, "optimizer": self.optimizer,
                "batch_size": self.batch_size,
                "rows": [dataclasses.asdict(r) for r in self.rows], "totals": self.totals()}

    def to_text(self) -> str:
        head = ("layer", "kind", "weights") + COLUMNS
        kib = lambda bits: f"{bits / 8 / 1024:.1f}"  # noqa: E731
        lines = [head]
        for r in self.rows:
            lines.append((r.layer, r.kind, str(r.weights)) + tuple(kib(getattr(r, c))
                                                                   for c in COLUMNS))
        t = self.totals()
        lines.append(("total (KiB)", "", str(sum(r.weights for r in self.rows)))
                     + tuple(kib(t[c]) for c in COLUMNS))
        widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
        text = [f"{self.model}, {self.method}, {self.optimizer}, batch {self.batch_size} "
                f"(bits/8/1024 = KiB; gradient_buffers total = largest layer)"]
        for line in lines:
            text.append("  ".join(cell.rjust(w) if i > 1 else cell.ljust(w)
                                  for i, (cell, w) in enumerate(zip(line, widths))))
        text.append(f"peak: {self.peak_mib:.3f} MiB")
        return "\n".join(text)

    __str__ = to_text


# --------------------------------------------------------------------------------------
# Per-layer rules
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Widths:
    config: Optional[LowMemoryConfig]
    batch_size: int
    optimizer: str
    optimizer_bits: int

    @property
    def low(self):
        return self.config is not None

    @property
    def latent(self):  # binary layers and their l1 batch norms
        return 16 if self.low and self.config.latent_weights == "float16" else 32

    @property
    def grad_x(self):
        if not self.low or self.config.activation_grad == "float32":
            return 32
        if self.config.activation_grad == "float16":
            return 16
        return 1 + self.config.po2_exponent_bits


def _per_example(shape):
    return int(math.prod(int(d) for d in shape[1:]))


def _shapes(layer):
    ins = layer.input if not isinstance(layer.input, list) else layer.input[0]
    return _per_example(ins.shape), _per_example(layer.output.shape)


def _is_binary_layer(layer):
    if isinstance(layer, (bl.BinaryDense, bl.BinaryConv2D)):
        return True
    quantizer = getattr(layer, "kernel_quantizer", None)
    return quantizer is not None and getattr(quantizer, "precision", None) == 1


def _first_layer(layer):
    if isinstance(layer, (bl.BinaryDense, bl.BinaryConv2D)):
        return layer.first_layer
    return getattr(layer, "input_quantizer", None) is None


def _weights_row(row, count, latent_bits, grad_bits, slots, w):
    row.weights += count
    row.latent_weights += count * latent_bits
    row.weight_gradients += count * grad_bits
    row.optimizer_slots += count * slots * w.optimizer_bits


def _binary_layer(layer, row, w, n_in, n_out):
    count = int(layer.kernel.shape.num_elements())
    cfg = layer.config if isinstance(layer, (bl.BinaryDense, bl.BinaryConv2D)) else None
    latent = 16 if cfg is not None and cfg.latent_weights == "float16" else 32
    grad = 1 if cfg is not None and cfg.binarize_weight_grads else latent
    _weights_row(row, count, latent, grad, optimizer_slots(w.optimizer, True), w)
    if _first_layer(layer) or cfg is None or not cfg.binary_activation_retention:
        row.saved_activations = w.batch_size * n_in * 32
    else:
        row.saved_activations = w.batch_size * n_in * 2   # sign bit + STE-mask bit


def _l1_batch_norm(layer, row, w, n_in, n_out):
    channels = int(layer.beta.shape[0])
    cfg = layer.config
    latent = 16 if cfg is not None and cfg.latent_weights == "float16" else 32
    _weights_row(row, channels, latent, latent, optimizer_slots(w.optimizer, False), w)
    row.statistics = 2 * channels * latent
    row.saved_activations = w.batch_size * n_in * 1 + 2 * channels * latent


def _batch_norm(layer, row, w, n_in, n_out):
    channels = int(layer.moving_mean.shape[0])
    trainable = sum(int(v.shape.num_elements()) for v in layer.trainable_weights)
    _weights_row(row, trainable, 32, 32, optimizer_slots(w.optimizer, False), w)
    row.statistics = 2 * channels * 32
    row.saved_activations = w.batch_size * n_in * 32 + 2 * channels * 32


def _real_layer(layer, row, w, n_in, n_out):
    for var in layer.trainable_weights:
        _weights_row(row, int(var.shape.num_elements()), 32, 32,
                     optimizer_slots(w.optimizer, False), w)
    row.saved_activations = w.batch_size * n_in * 32


def _max_pool(layer, row, w, n_in, n_out):
    if isinstance(layer, bl.LowMemoryMaxPooling2D):  # keeps the argmax index per output
        area = int(math.prod(layer.pool_size))
        row.saved_activations = w.batch_size * n_out * max(1, math.ceil(math.log2(area)))
    else:  # autodiff's MaxPoolGrad takes the float input
        row.saved_activations = w.batch_size * n_in * 32


def _activation(layer, row, w, n_in, n_out):
    if getattr(layer.activation, "__name__", "") != "linear":
        row.saved_activations = w.batch_size * n_out * 32


def _nothing_saved(layer, row, w, n_in, n_out):
    """Average pools and Add: constant derivatives, so the backward keeps no activation
    (their gradient buffers are counted by ``_row``)."""


_RULES = (
    ("binary", _is_binary_layer, _binary_layer),
    ("l1_batch_norm", lambda l: isinstance(l, bl.L1BatchNormalization), _l1_batch_norm),
    ("batch_norm", lambda l: isinstance(l, keras.layers.BatchNormalization), _batch_norm),
    ("max_pool", lambda l: isinstance(l, keras.layers.MaxPooling2D), _max_pool),
    ("real", lambda l: isinstance(l, (keras.layers.Dense, keras.layers.Conv2D)), _real_layer),
    ("activation", lambda l: isinstance(l, keras.layers.Activation), _activation),
    ("avg_pool", lambda l: isinstance(l, (keras.layers.AveragePooling2D,
                                          keras.layers.GlobalAveragePooling2D)), _nothing_saved),
    ("add", lambda l: isinstance(l, keras.layers.Add), _nothing_saved),
    ("shape", lambda l: isinstance(l, (keras.layers.Flatten, keras.layers.Reshape,
                                       keras.layers.InputLayer)), None),
)


def _row(layer, w):
    for kind, matches, rule in _RULES:
        if matches(layer):
            row = MemoryRow(layer.name, kind)
            if rule is not None:  # reshapes pass their gradient through: no buffer
                n_in, n_out = _shapes(layer)
                rule(layer, row, w, n_in, n_out)
                row.gradient_buffers = w.batch_size * (n_in + n_out) * w.grad_x
            return row
    raise ValueError(
        f"memory_profile has no rule for layer {layer.name!r} of type "
        f"{type(layer).__name__}; supported: binary larq/keras_coherence layers, batch "
        "norms, Dense, Conv2D, max/average pooling, Activation, Flatten, Reshape, Add.")


def _describe(layer):
    config = getattr(layer, "config", None)
    label = method_name(config) if isinstance(layer, bl.LOW_MEMORY_LAYERS) and config \
        else "standard"
    return f"{layer.name!r} ({type(layer).__name__}, {label})"


def _model_config(model):
    """The model's method read from its layers: the ``LowMemoryConfig`` of its low-memory
    layers, or None for standard layers (larq's, or ours built with ``method="standard"``).

    Raises:
        ValueError: the layers mix methods.
    """
    ours = [l for l in model.layers if isinstance(l, bl.LOW_MEMORY_LAYERS)]
    larq_binary = [l for l in model.layers
                   if _is_binary_layer(l) and not isinstance(l, bl.LOW_MEMORY_LAYERS)]
    by_config = {}
    for layer in ours:
        by_config.setdefault(layer.config, layer)
    if larq_binary and any(c is not None for c in by_config):
        low = next(l for c, l in by_config.items() if c is not None)
        raise ValueError(
            f"model {model.name!r} mixes standard binary layers ({_describe(larq_binary[0])}) "
            f"with low-memory ones ({_describe(low)}); memory_profile describes one method "
            "per model: build it with one method.")
    if len(by_config) > 1:
        raise ValueError(
            f"model {model.name!r} mixes layers of several methods ("
            + ", ".join(_describe(l) for l in by_config.values())
            + "); memory_profile describes one method per model: build it with one method.")
    return next(iter(by_config)) if by_config else None


def _check_method(model, requested, derived):
    """Refuses a ``method`` that contradicts the model's layers (the table would mix both)."""
    if requested == derived:
        return
    evidence = [l for l in model.layers if isinstance(l, bl.LOW_MEMORY_LAYERS) or _is_binary_layer(l)]
    what = (f"its layers are {method_name(derived) if derived is not None else 'standard'}"
            + (f" (e.g. {_describe(evidence[0])})" if evidence else " (no binary layers)"))
    wanted = method_name(requested) if requested is not None else "standard"
    raise ValueError(
        f"memory_profile(method={wanted!r}) contradicts model {model.name!r}: {what}. Pass "
        f"method=None to profile the model as built, or profile a model built with "
        f"method={wanted!r} (e.g. memory_profile(name, method={wanted!r})).")


def memory_profile(model_or_name, batch_size: int = 100, method=None,
                   optimizer: str = "adam", optimizer_bits: int = 32,
                   **build_kwargs) -> MemoryProfile:
    """Per-layer training memory of a binary model (see the module docstring).

    Args:
        model_or_name: a built Keras model, or a name of
            :data:`~keras_coherence.binary.models.MODEL_NAMES` (built with ``method``
            and the paper's input shape unless ``build_kwargs`` say otherwise).
        batch_size: examples per step.
        method: for a name, ``"standard"``, ``"low_memory"``, ... (default
            ``"standard"``); for a model, ``None`` reads it from the model's layers, and a
            given method must be the one its layers use.
        optimizer: ``"adam"``, ``"bop"`` or ``"sgd"`` (number of slots).
        optimizer_bits: width of one optimizer slot element.

    Raises:
        ValueError: bad sizes, unknown method/optimizer, a layer without a rule, a model
            whose layers mix methods, or a ``method`` its layers contradict.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer.")
    if isinstance(optimizer_bits, bool) or not isinstance(optimizer_bits, int) \
            or optimizer_bits < 1:
        raise ValueError(f"optimizer_bits={optimizer_bits!r} must be a positive integer.")
    optimizer_slots(optimizer, True)  # validates the name
    if isinstance(model_or_name, keras.Model):
        model = model_or_name
        if build_kwargs:
            raise ValueError("build_kwargs only apply when a model name is given.")
        config = _model_config(model)
        if method is not None:
            _check_method(model, resolve_method(method), config)
    else:
        from keras_coherence.binary.models import build_model
        method = "standard" if method is None else method
        config = resolve_method(method)
        model = build_model(model_or_name, method, **build_kwargs)
    w = _Widths(config, batch_size, optimizer, optimizer_bits)
    rows = [_row(layer, w) for layer in model.layers]
    return MemoryProfile(rows=rows, batch_size=batch_size,
                         method=method_name(config if config is not None else "standard"),
                         optimizer=optimizer, model=model.name)


def memory_ratio(name: str, batch_size: int = 100, method="low_memory",
                 optimizer: str = "adam", optimizer_bits: int = 32, **build_kwargs) -> float:
    """Modelled peak memory of standard training over that of ``method``."""
    std = memory_profile(name, batch_size, "standard", optimizer, optimizer_bits,
                         **build_kwargs)
    low = memory_profile(name, batch_size, method, optimizer, optimizer_bits, **build_kwargs)
    return std.peak_bits / low.peak_bits

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

Device layout
-------------

``memory_profile(..., layout="device")`` models instead what the on-device training graph
of :mod:`keras_coherence.binary.export_training` holds when LiteRT runs it
(``TrainingModule(model, batch_size=B, scratch_bytes=...)``, Adam); the method must export
(``"standard_device"``, ``"low_memory"``, ``"low_memory_po2"``, not larq's ``"standard"``).
Every number below was read from exported flatbuffers (``tensor_breakdown`` and a replay of
their op order, ``benchmarks/bnn_device_memory.py``) and from LiteRT runs of them:

* ``latent_weights`` -- every trainable variable, float32 (float16 latent weights are
  float32 variables rounded where they are used);
* ``optimizer_slots`` -- Adam's ``m`` and ``v``, float32 per trainable weight, and the
  float32 step counter (in a row ``optimizer``);
* ``statistics`` -- moving statistics, float32. These three columns are the state:
  together they are the bytes of the ``get_weights`` signature's outputs;
* ``saved_activations`` -- the tensors alive across the turn from the forward pass to the
  backward pass. Bits are packed 32 per int32 word *per example* (``[B, ceil(n / 32)]``
  words for ``n`` elements per example; a kernel ``[1, ceil(n_w / 32)]``). A binary layer:
  its kernel's mask words (``|w| <= 1``), and its sign words when it hands a gradient to
  its input (a layer whose input depends on no trainable weight -- the first layer --
  computes no input gradient); its input as sign words (plus mask words when it hands a
  gradient on) with ``binary_activation_retention``, else (and for a first layer) as a
  float32 copy. l1 batch norm: the sign words of ``x_hat`` plus ``sigma`` and ``s``
  (float32 per channel). Device batch norm: ``x_hat`` (float32) plus ``gamma / sigma`` per
  channel. ``LowMemoryMaxPooling2D``: a ``bool`` per *input* element (whether it equals
  its window's maximum; the exported graph computes the ``uint8`` argmax per output only
  in the backward pass). ``DeviceMaxPooling2D``: one ``bool`` mask of the output's shape
  per window position (which element is its window's first maximum: those masks depend
  only on forward tensors, and the converter computes them in the forward pass).
  ``DeviceReLU``: a ``bool`` mask (8 bits) per element. A real convolution or dense
  layer: its float32 input, and its float32 kernel when it hands a gradient on (checked
  on a 1x1 ``DeviceConv2D``; Keras ``Dense`` is not). Average pools, ``Add`` and
  reshapes: nothing. The loss (a row ``loss``): the softmax probabilities and the one-hot
  labels (float32 ``[B, classes]`` each) and a float32 scalar;
* ``file_constants`` -- the mmapped model file's initial values, which the init subgraph
  reads at load (so they count in the process's memory): every variable's initial value
  (float32) and one float32 zeros constant per distinct trainable shape for Adam's slots
  (in the ``optimizer`` row). The file's graph structure is in ``runtime``;
* ``runtime`` -- :data:`DEVICE_RUNTIME_BYTES`: what a LiteRT interpreter (no XNNPACK)
  adds beyond the state, the file, its arena's live tensors and its kernel scratch,
  measured on the MLP with hidden widths (64, 64) at batch 32 (0.36 to 0.52 MiB;
  0.26 to 0.3 MiB for the MLP at batch 100), in a row ``runtime``;
* ``working_set`` -- transient, the largest row counts: the larger of (a)
  :data:`DEVICE_ACTIVATION_BUFFERS` float32 buffers of ``B x max(n_in, n_out)`` plus the
  layer's kernel scratch, and (b) :data:`DEVICE_ADAM_BUFFERS` float32 buffers of the
  layer's largest variable (its Adam update). Kernel scratch: a convolution's im2col
  buffer, per example ``4 x max(ceil(H/s) x ceil(W/s) x kh*kw*C_in, H x W x kh*kw*C_out)``
  bytes (forward and the two backward convolutions) times the examples of one batch
  chunk (the batch is split so that one chunk's buffer stays within ``scratch_bytes``,
  as the export does); a dense layer's matmul adds one kernel-sized float32 buffer.

``weight_gradients`` and ``gradient_buffers`` are 0 in this layout: a weight gradient lives
only until its Adam update, and activation gradients are among the working set's buffers.
``peak = sum(persistent columns) + max(working_set)``: the figure to compare with the
interpreter peak of ``benchmarks/bnn_device_memory.py``. ``tests/test_binary_memory.py``
checks the kept tensors, the state and the file constants against real exports. Against
LiteRT's measured peaks (2026-12-02; standard_device / low_memory): MLP batch 100 12.7 /
11.9 MiB modelled vs 14.7 / 14.7 measured, batch 1000 28.4 / 20.9 vs 34.2 / 26.4 (the
graph keeps every dense layer's transposed output gradient until the Adam updates, which
the three activation buffers do not count, and ``FULLY_CONNECTED`` allocates about
1.5 MiB outside the arena); CNV batch 8 59.3 / 52.4 vs 60.9 / 56.3, batch
100 210 / 123 vs 192 / 105 (the working set's three buffers and the im2col buffer are not
all alive at the same op); BinaryNet batch 100 low-memory 468 vs 515.

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

from keras_coherence._internals.keras_graph import inbound_layers
from keras_coherence._keras import keras
from keras_coherence.binary import layers as bl
from keras_coherence.binary import ops
from keras_coherence.binary.config import LowMemoryConfig, method_name, resolve_method
from keras_coherence.binary.training import optimizer_slots

__all__ = ["MemoryRow", "MemoryProfile", "memory_profile", "memory_ratio", "COLUMNS",
           "DEVICE_COLUMNS", "LAYOUTS", "DEVICE_RUNTIME_BYTES", "DEVICE_ACTIVATION_BUFFERS",
           "DEVICE_ADAM_BUFFERS", "DEFAULT_SCRATCH_BYTES"]

#: The bit columns of a :class:`MemoryRow` in the paper's layout, in table order.
COLUMNS = ("latent_weights", "weight_gradients", "optimizer_slots", "statistics",
           "saved_activations", "gradient_buffers")
_PERSISTENT = COLUMNS[:-1]

#: The bit columns of the device layout, in table order (``working_set`` is transient).
DEVICE_COLUMNS = ("latent_weights", "optimizer_slots", "statistics", "saved_activations",
                  "file_constants", "runtime", "working_set")
_DEVICE_PERSISTENT = DEVICE_COLUMNS[:-1]

#: ``layout`` values of :func:`memory_profile`.
LAYOUTS = ("paper", "device")

#: Fixed cost of a LiteRT interpreter (no XNNPACK) beyond the state, the model file, the
#: arena's live tensors and the kernel scratch: interpreter peak minus those, measured on
#: the exported MLP with hidden widths (64, 64) at batch 32 (0.36 to 0.52 MiB).
DEVICE_RUNTIME_BYTES = 2 ** 19

#: Float32 activation-sized buffers alive at once around one layer of the device graph:
#: the replay of CNV's batch-100 low-memory graph peaks in conv_2's forward pass with its
#: float32 input, the input's signs and the batch chunks' copies of them (75 MiB = 3.4 x
#: the 22 MiB activation).
DEVICE_ACTIVATION_BUFFERS = 3

#: Weight-shaped float32 buffers alive at once in one variable's Adam update of the device
#: graph (the gradient, ``m * alpha``, ``v``'s and the weight's reads, ``g ** 2``): the
#: arena's peak of the MLP at batch 32 and 100 and of CNV at batch 8, in both methods.
DEVICE_ADAM_BUFFERS = 5

#: The device layout's default im2col budget of one convolution, as
#: ``export_training.TrainingModule``'s ``scratch_bytes`` default.
DEFAULT_SCRATCH_BYTES = 16 * 2 ** 20


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
    file_constants: int = 0
    runtime: int = 0
    working_set: int = 0
    #: device layout: what the layer keeps for its backward, ``(what, dtype, shape)`` each
    kept: tuple = ()

    @property
    def persistent(self) -> int:
        """Bits held through the step (everything but the transient ``gradient_buffers``
        and ``working_set``)."""
        return sum(getattr(self, c) for c in _PERSISTENT + ("file_constants", "runtime"))


@dataclasses.dataclass
class MemoryProfile:
    """Per-layer rows plus totals; ``str()`` is a text table in KiB."""

    rows: List[MemoryRow]
    batch_size: int
    method: str
    optimizer: str
    model: str
    layout: str = "paper"

    @property
    def columns(self):
        """The layout's columns (:data:`COLUMNS` or :data:`DEVICE_COLUMNS`)."""
        return DEVICE_COLUMNS if self.layout == "device" else COLUMNS

    def totals(self) -> dict:
        """Column sums in bits (the transient column, ``gradient_buffers`` or
        ``working_set``: the largest row's), and ``peak``."""
        columns = self.columns
        out = {c: sum(getattr(r, c) for r in self.rows) for c in columns[:-1]}
        out[columns[-1]] = max((getattr(r, columns[-1]) for r in self.rows), default=0)
        out["peak"] = sum(out.values())
        return out

    def state_bits(self) -> int:
        """Device layout: bits of the training state (latent weights, Adam, statistics),
        what the export's ``get_weights`` returns."""
        t = self.totals()
        return t["latent_weights"] + t["optimizer_slots"] + t["statistics"]

    @property
    def peak_bits(self) -> int:
        return self.totals()["peak"]

    @property
    def peak_mib(self) -> float:
        return self.peak_bits / 8 / 2 ** 20

    def as_dict(self) -> dict:
        return {"model": self.model, "method": self.method, "optimizer": self.optimizer,
                "batch_size": self.batch_size, "layout": self.layout,
                "rows": [dataclasses.asdict(r) for r in self.rows], "totals": self.totals()}

    def to_text(self) -> str:
        columns = self.columns
        head = ("layer", "kind", "weights") + columns
        kib = lambda bits: f"{bits / 8 / 1024:.1f}"  # noqa: E731
        lines = [head]
        for r in self.rows:
            lines.append((r.layer, r.kind, str(r.weights)) + tuple(kib(getattr(r, c))
                                                                   for c in columns))
        t = self.totals()
        lines.append(("total (KiB)", "", str(sum(r.weights for r in self.rows)))
                     + tuple(kib(t[c]) for c in columns))
        widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
        text = [f"{self.model}, {self.method}, {self.optimizer}, batch {self.batch_size}, "
                f"{self.layout} layout (bits/8/1024 = KiB; {columns[-1]} total = largest row)"]
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


# --------------------------------------------------------------------------------------
# Device layout: what the exported training graph holds
# --------------------------------------------------------------------------------------


def _words(n):
    """int32 words of ``n`` packed bits."""
    return -(-int(n) // 32)


def _elements(shape):
    return int(math.prod(int(d) for d in shape))


def _needs_input_grad(model):
    """``{layer name: bool}``: whether the layer's input depends on a trainable weight,
    i.e. whether the device graph computes the gradient the layer hands to its input."""
    depends, out = {}, {}
    for layer in model.layers:
        inbound = inbound_layers(layer)
        out[layer.name] = any(depends.get(l.name, False) for l in inbound)
        depends[layer.name] = out[layer.name] or bool(layer.trainable_weights)
    return out


def _conv_scratch_bytes(layer, batch, budget):
    """Largest im2col buffer of the layer's convolutions (forward, input and kernel
    gradient), each over one batch chunk, as ``ops.binary_conv2d`` / ``real_ops.conv2d``
    split them."""
    forward, backward = ops.conv_scratch_bytes(layer.input.shape, layer.kernel.shape,
                                               layer.strides)
    return max(ops.chunk_examples(batch, forward, budget) * forward,
               ops.chunk_examples(batch, backward, budget) * backward)


def _variable_bits(layer):
    return sum(_elements(v.shape) for v in layer.weights) * 32


def _device_kind(layer):
    if isinstance(layer, (bl.BinaryDense, bl.BinaryConv2D)):
        return "binary"
    if isinstance(layer, bl.L1BatchNormalization):
        return "l1_batch_norm"
    if isinstance(layer, keras.layers.BatchNormalization):
        return "batch_norm"
    if isinstance(layer, bl.LowMemoryMaxPooling2D):
        return "max_pool"
    if isinstance(layer, keras.layers.MaxPooling2D):
        return "max_pool"
    if isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D)):
        return "real"
    if isinstance(layer, keras.layers.Activation):
        return "activation"
    if isinstance(layer, (keras.layers.AveragePooling2D, keras.layers.GlobalAveragePooling2D)):
        return "avg_pool"
    if isinstance(layer, keras.layers.Add):
        return "add"
    if isinstance(layer, (keras.layers.Flatten, keras.layers.Reshape, keras.layers.InputLayer)):
        return "shape"
    raise ValueError(
        f"memory_profile(layout='device') has no rule for layer {layer.name!r} of type "
        f"{type(layer).__name__}; the device layout describes the layers that export for "
        "on-device training (keras_coherence.binary.export_training.SUPPORTED_LAYERS).")


def _device_row(layer, b, dx, budget):
    """One layer's row of the device layout (bits; see the module docstring)."""
    kind = _device_kind(layer)
    row = MemoryRow(layer.name, kind)
    if kind == "shape":
        return row
    trainable = sum(_elements(v.shape) for v in layer.trainable_weights)
    row.weights = trainable
    row.latent_weights = 32 * trainable
    row.optimizer_slots = 2 * 32 * trainable
    row.statistics = 32 * sum(_elements(v.shape) for v in layer.non_trainable_weights)
    row.file_constants = _variable_bits(layer)
    ins = layer.input if not isinstance(layer.input, list) else layer.input[0]
    in_shape = [b] + [int(d) for d in ins.shape[1:]]
    out_shape = [b] + [int(d) for d in layer.output.shape[1:]]
    n_in, n_out = _elements(in_shape[1:]), _elements(out_shape[1:])
    kept, scratch = [], 0
    if kind == "binary":
        n_w = _elements(layer.kernel.shape)
        kept.append(("kernel mask words", "int32", [1, _words(n_w)]))
        if dx:
            kept.append(("kernel sign words", "int32", [1, _words(n_w)]))
        if layer.first_layer or not layer.config.binary_activation_retention:
            kept.append(("input", "float32", in_shape))
        else:
            kept.append(("input sign words", "int32", [b, _words(n_in)]))
            if dx:
                kept.append(("input mask words", "int32", [b, _words(n_in)]))
        scratch = (_conv_scratch_bytes(layer, b, budget) if isinstance(layer, bl.BinaryConv2D)
                   else 4 * n_w)
    elif kind == "l1_batch_norm":
        channels = int(layer.beta.shape[0])
        if dx:  # dx needs them all (beta's gradient is a sum of dy)
            kept += [("x_hat sign words", "int32", [b, _words(n_in)]),
                     ("sigma", "float32", [channels]), ("s", "float32", [channels])]
    elif kind == "batch_norm":
        channels = int(layer.moving_mean.shape[0])
        kept += [("x_hat", "float32", in_shape), ("gamma / sigma", "float32", [channels])]
    elif kind == "max_pool":
        if isinstance(layer, bl.LowMemoryMaxPooling2D):
            # the uint8 argmax is computed in the backward pass: what crosses is the bool
            # "equals the window's maximum" of every input element
            kept.append(("is-maximum mask", "bool", in_shape))
        else:  # the backward's "first maximum" masks depend on x and y only: the
            # converter computes them in the forward pass, one per window position
            area = int(math.prod(layer.pool_size))
            kept += [(f"first-maximum mask {i}", "bool", out_shape) for i in range(area)]
    elif kind == "real":
        kept.append(("input", "float32", in_shape))
        if dx:
            kept.append(("kernel", "float32", [int(d) for d in layer.kernel.shape]))
        scratch = (_conv_scratch_bytes(layer, b, budget) if isinstance(layer, keras.layers.Conv2D)
                   else 4 * _elements(layer.kernel.shape))
    elif kind == "activation" and getattr(layer.activation, "__name__", "") != "linear":
        kept.append(("mask", "bool", in_shape))
    row.kept = tuple((what, dtype, tuple(shape)) for what, dtype, shape in kept)
    row.saved_activations = sum(_elements(shape) * _DTYPE_BITS[dtype]
                                for _, dtype, shape in row.kept)
    largest = max((_elements(v.shape) for v in layer.weights), default=0)
    row.working_set = max(DEVICE_ACTIVATION_BUFFERS * b * max(n_in, n_out) * 32 + 8 * scratch,
                          DEVICE_ADAM_BUFFERS * largest * 32)
    return row


_DTYPE_BITS = {"float32": 32, "int32": 32, "uint8": 8, "bool": 8}


def _device_rows(model, b, budget):
    dx = _needs_input_grad(model)
    rows = [_device_row(layer, b, dx[layer.name], budget) for layer in model.layers]
    classes = _per_example(model.output.shape)
    loss = MemoryRow("loss", "loss", kept=(("softmax", "float32", (b, classes)),
                                           ("one-hot labels", "float32", (b, classes)),
                                           ("1 / batch", "float32", ())))
    loss.saved_activations = (2 * b * classes + 1) * 32
    shapes = {tuple(int(d) for d in v.shape) for v in model.trainable_weights}
    optimizer = MemoryRow("optimizer", "optimizer", optimizer_slots=32,
                          file_constants=32 * (1 + sum(_elements(s) for s in shapes)))
    runtime = MemoryRow("runtime", "runtime", runtime=8 * DEVICE_RUNTIME_BYTES)
    return rows + [loss, optimizer, runtime]


def memory_profile(model_or_name, batch_size: int = 100, method=None,
                   optimizer: str = "adam", optimizer_bits: int = 32, layout: str = "paper",
                   scratch_bytes=DEFAULT_SCRATCH_BYTES, **build_kwargs) -> MemoryProfile:
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
        layout: ``"paper"`` (the paper's accounting, above) or ``"device"`` (what the
            exported on-device training graph holds in LiteRT; Adam with float32 slots,
            methods that export only).
        scratch_bytes: device layout: the export's im2col budget per convolution
            (``TrainingModule(scratch_bytes=...)``; None: no batch split).

    Raises:
        ValueError: bad sizes, unknown method/optimizer/layout, a layer without a rule, a
            model whose layers mix methods, a ``method`` its layers contradict, or a
            device layout of a model or optimizer the export does not train.

    >>> round(memory_profile("mlp", 100, "low_memory", layout="device").peak_mib, 1)
    11.9
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} must be one of {', '.join(map(repr, LAYOUTS))}.")
    if layout == "device":
        if optimizer != "adam" or optimizer_bits != 32:
            raise ValueError(
                f"layout='device' models the exported training graph, whose optimizer is Adam "
                f"with float32 slots; got optimizer={optimizer!r}, optimizer_bits="
                f"{optimizer_bits!r}. Use the defaults, or layout='paper'.")
        if scratch_bytes is not None and (isinstance(scratch_bytes, bool) or not isinstance(
                scratch_bytes, int) or scratch_bytes < 1):
            raise ValueError(f"scratch_bytes={scratch_bytes!r} must be a positive number of "
                             "bytes or None (no batch split).")
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
        from keras_coherence.binary.models import build_binary_model
        method = "standard" if method is None else method
        config = resolve_method(method)
        model = build_binary_model(model_or_name, method, **build_kwargs)
    if layout == "device":
        if config is None:
            raise ValueError(
                f"layout='device' models the exported on-device training graph, and model "
                f"{model.name!r} is standard (larq's layers, which do not export): build it "
                "with method='standard_device' for the standard arithmetic on the device, "
                "or use layout='paper'.")
        rows = _device_rows(model, batch_size, scratch_bytes)
    else:
        w = _Widths(config, batch_size, optimizer, optimizer_bits)
        rows = [_row(layer, w) for layer in model.layers]
    return MemoryProfile(rows=rows, batch_size=batch_size,
                         method=method_name(config if config is not None else "standard"),
                         optimizer=optimizer, model=model.name, layout=layout)


def memory_ratio(name: str, batch_size: int = 100, method="low_memory",
                 optimizer: str = "adam", optimizer_bits: int = 32, layout: str = "paper",
                 **build_kwargs) -> float:
    """Modelled peak memory of standard training over that of ``method`` (device layout:
    of ``"standard_device"``, the standard arithmetic that exports, over ``method``)."""
    baseline = "standard_device" if layout == "device" else "standard"
    std = memory_profile(name, batch_size, baseline, optimizer, optimizer_bits, layout,
                         **build_kwargs)
    low = memory_profile(name, batch_size, method, optimizer, optimizer_bits, layout,
                         **build_kwargs)
    return std.peak_bits / low.peak_bits

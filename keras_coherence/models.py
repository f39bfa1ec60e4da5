"""Small Keras 2 model builders used by the CLI, the examples and the benchmarks.

Every builder returns an **uncompiled Functional** model whose output is the
**logits** (no softmax): compile it with
``keras.losses.SparseCategoricalCrossentropy(from_logits=True)``. Functional models
take the fast per-layer path of :func:`keras_coherence.gradient_stats` and can be
wrapped by :func:`keras_coherence.coherence.with_coherence`.

* :func:`mlp` -- Flatten, ReLU Dense layers, Dense logits.
* :func:`small_cnn` -- Conv(32)-Pool-Conv(64)-Pool-Dense(128)-Dense(logits).
* :func:`mobilenet_v1`, :func:`mobilenet_v2` -- untrained ``keras.applications``
  MobileNets (width ``alpha``) with logits, for inputs of at least 32x32;
  :func:`pad_images` brings MNIST-sized images (28x28x1) to 32x32x3.
* :func:`text_transformer` -- a small text classifier: token embedding, encoder blocks
  (MultiHeadAttention and a ReLU feed-forward, each with a residual and
  LayerNormalization), average pooling, logits.
* :func:`build_float_model` -- one of the image models above by name, from the
  :data:`FLOAT_MODELS` registry; :func:`register` adds a builder of your own to it.

>>> model = mlp(hidden=(32,))
>>> model.output_shape, [layer.name for layer in model.layers]
((None, 10), ['input', 'flatten', 'dense_1', 'logits'])
>>> build_float_model("cnn").count_params()
225034
"""
from __future__ import annotations

import numbers
from typing import Sequence, Tuple

from keras_coherence._deprecation import deprecated_alias
from keras_coherence._keras import keras
from keras_coherence._registry import Registry, lowercase_name

__all__ = ["FLOAT_MODELS", "MODEL_NAMES", "build_float_model", "mlp", "mobilenet_v1",
           "mobilenet_v2", "pad_images", "register", "small_cnn", "text_transformer"]

#: The float model builders by name: :func:`register` adds to it, :func:`build_float_model` reads it.
FLOAT_MODELS = Registry("model", normalize=lowercase_name)


def register(name: str, *, aliases: Sequence[str] = (), replace: bool = False):
    """Decorator: make a model builder ``fn(input_shape=..., num_classes=..., **options)``
    (returning an uncompiled Functional model with logits) buildable by ``name`` (or any
    of ``aliases``, case-insensitive) with :func:`build_float_model`. A name already
    taken raises ``ValueError`` unless ``replace=True``.

    >>> @register("tiny_mlp")
    ... def tiny_mlp(input_shape=(28, 28, 1), num_classes=10):
    ...     return mlp(input_shape, num_classes, hidden=(4,), name="tiny_mlp")
    >>> build_float_model("tiny_mlp", (6,), 3).count_params()
    43
    >>> del FLOAT_MODELS["tiny_mlp"]  # (this example's builder is not kept)
    """
    return FLOAT_MODELS.register(name, aliases=aliases, replace=replace)


def _check_common(input_shape, num_classes):
    try:
        shape = tuple(int(d) for d in input_shape)
    except (TypeError, ValueError):
        raise ValueError(
            f"input_shape={input_shape!r} must be a tuple of positive integers, e.g. (28, 28, 1)."
        ) from None
    if not shape or any(d < 1 for d in shape):
        raise ValueError(
            f"input_shape={input_shape!r} must be a non-empty tuple of positive integers."
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) \
            or num_classes < 2:
        raise ValueError(f"num_classes={num_classes!r} must be an integer >= 2.")
    return shape, int(num_classes)


@register("mlp")
def mlp(input_shape: Sequence[int] = (28, 28, 1), num_classes: int = 10,
        hidden: Sequence[int] = (512, 512), name: str = "mlp") -> keras.Model:
    """A multilayer perceptron: ``Flatten -> [Dense(h, relu) for h in hidden] -> Dense(logits)``.

    Args:
        input_shape: shape of one example (without the batch axis).
        num_classes: number of output logits.
        hidden: widths of the ReLU hidden layers (may be empty: a linear model).
        name: model name.

    Layers are named ``flatten``, ``dense_1`` .. ``dense_K`` and ``logits``, so
    per-layer coherence keys read ``m_coherence/dense_1`` etc.
    """
    shape, num_classes = _check_common(input_shape, num_classes)
    widths = tuple(hidden)
    if any(isinstance(w, bool) or not isinstance(w, numbers.Integral) or w < 1 for w in widths):
        raise ValueError(f"hidden={hidden!r} must be a sequence of positive integers.")
    inputs = keras.Input(shape, name="input")
    h = keras.layers.Flatten(name="flatten")(inputs)
    for i, width in enumerate(widths, start=1):
        h = keras.layers.Dense(int(width), activation="relu", name=f"dense_{i}")(h)
    outputs = keras.layers.Dense(num_classes, name="logits")(h)
    return keras.Model(inputs, outputs, name=name)


@register("cnn", aliases=("small_cnn",))
def small_cnn(input_shape: Sequence[int] = (28, 28, 1), num_classes: int = 10,
              name: str = "small_cnn") -> keras.Model:
    """A small convolutional network for 28x28 (or larger) images.

    ``Conv2D(32, 3, relu) -> MaxPool(2) -> Conv2D(64, 3, relu) -> MaxPool(2) ->
    Flatten -> Dense(128, relu) -> Dense(num_classes)`` (logits); 225,034 parameters
    on 28x28x1 inputs with 10 classes. Layers are named ``conv_1``, ``pool_1``,
    ``conv_2``, ``pool_2``, ``flatten``, ``dense_1``, ``logits``.
    """
    shape, num_classes = _check_common(input_shape, num_classes)
    if len(shape) != 3:
        raise ValueError(
            f"small_cnn needs image inputs of shape (height, width, channels), got "
            f"input_shape={tuple(input_shape)!r}."
        )
    if min(shape[0], shape[1]) < 10:
        raise ValueError(
            f"small_cnn needs images of at least 10x10 pixels (two 3x3 convs and two "
            f"2x2 pools), got input_shape={tuple(input_shape)!r}."
        )
    inputs = keras.Input(shape, name="input")
    h = keras.layers.Conv2D(32, 3, activation="relu", name="conv_1")(inputs)
    h = keras.layers.MaxPooling2D(2, name="pool_1")(h)
    h = keras.layers.Conv2D(64, 3, activation="relu", name="conv_2")(h)
    h = keras.layers.MaxPooling2D(2, name="pool_2")(h)
    h = keras.layers.Flatten(name="flatten")(h)
    h = keras.layers.Dense(128, activation="relu", name="dense_1")(h)
    outputs = keras.layers.Dense(num_classes, name="logits")(h)
    return keras.Model(inputs, outputs, name=name)


def text_transformer(sequence_length: int = 64, vocab_size: int = 1000, num_classes: int = 2,
                     embed_dim: int = 128, num_heads: int = 4, ffn_dim: int = 512, blocks: int = 2,
                     name: str = "text_transformer") -> keras.Model:
    """A small Transformer-encoder text classifier on int32 token ids ``[sequence_length]``.

    ``Embedding(vocab_size, embed_dim, mask_zero=True)`` (id 0 is padding), then ``blocks``
    times: ``h = LayerNorm(h + MultiHeadAttention(h, h))`` and
    ``h = LayerNorm(h + Dense(embed_dim)(Dense(ffn_dim, relu)(h)))``, then
    ``GlobalAveragePooling1D`` and ``Dense(num_classes)`` logits. It has no position
    embedding (the attention sees a bag of tokens); it is sized for measuring the cost of
    per-example gradient statistics on attention, not for accuracy. Layers are named
    ``embed``, ``block_i_attention``, ``block_i_ffn_1`` ... and ``logits``.

    >>> text_transformer(sequence_length=8, vocab_size=20, embed_dim=8, num_heads=2,
    ...                  ffn_dim=16, blocks=1).count_params()
    778
    """
    sizes = {"sequence_length": sequence_length, "vocab_size": vocab_size, "embed_dim": embed_dim,
             "num_heads": num_heads, "ffn_dim": ffn_dim, "blocks": blocks}
    for key, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{key}={value!r} must be a positive integer.")
    _, num_classes = _check_common((sequence_length,), num_classes)
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim={embed_dim} must be a multiple of num_heads={num_heads}.")
    inputs = keras.Input((int(sequence_length),), dtype="int32", name="tokens")
    h = keras.layers.Embedding(int(vocab_size), int(embed_dim), mask_zero=True, name="embed")(inputs)
    for i in range(1, int(blocks) + 1):
        attended = keras.layers.MultiHeadAttention(int(num_heads), int(embed_dim) // int(num_heads),
                                                   name=f"block_{i}_attention")(h, h)
        h = keras.layers.LayerNormalization(name=f"block_{i}_norm_1")(h + attended)
        f = keras.layers.Dense(int(ffn_dim), activation="relu", name=f"block_{i}_ffn_1")(h)
        f = keras.layers.Dense(int(embed_dim), name=f"block_{i}_ffn_2")(f)
        h = keras.layers.LayerNormalization(name=f"block_{i}_norm_2")(h + f)
    h = keras.layers.GlobalAveragePooling1D(name="pool")(h)
    outputs = keras.layers.Dense(num_classes, name="logits")(h)
    return keras.Model(inputs, outputs, name=name)


def _check_mobilenet(shape, alpha, name):
    if len(shape) != 3 or min(shape[0], shape[1]) < 32:
        raise ValueError(
            f"{name} needs images of at least 32x32 pixels, shape (height, width, channels), got "
            f"input_shape={shape!r}; pad_images() brings 28x28x1 MNIST images to 32x32x3."
        )
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not alpha > 0:
        raise ValueError(f"alpha={alpha!r} must be a positive number (the width multiplier).")
    return float(alpha)


@register("mobilenet_v1")
def mobilenet_v1(input_shape: Sequence[int] = (32, 32, 3), num_classes: int = 10, alpha: float = 0.25,
                 name: str = "mobilenet_v1") -> keras.Model:
    """MobileNet (v1) of ``keras.applications`` with width multiplier ``alpha``,
    untrained (``weights=None``), ending in logits (``classifier_activation=None``).

    Every convolution is followed by batch normalization (foldable for quantization);
    at 32x32 the last feature map is 1x1. ``alpha=0.25``: 221,114 parameters with
    10 classes.
    """
    shape, num_classes = _check_common(input_shape, num_classes)
    alpha = _check_mobilenet(shape, alpha, "mobilenet_v1")
    base = keras.applications.MobileNet(input_shape=shape, alpha=alpha, weights=None, classes=num_classes,
                                        classifier_activation=None)
    return keras.Model(base.inputs, base.outputs, name=name)


@register("mobilenet_v2")
def mobilenet_v2(input_shape: Sequence[int] = (32, 32, 3), num_classes: int = 10, alpha: float = 0.35,
                 name: str = "mobilenet_v2") -> keras.Model:
    """MobileNetV2 of ``keras.applications`` with width multiplier ``alpha``, untrained
    (``weights=None``), ending in logits. ``alpha=0.35``: 423,018 parameters with 10
    classes."""
    shape, num_classes = _check_common(input_shape, num_classes)
    alpha = _check_mobilenet(shape, alpha, "mobilenet_v2")
    base = keras.applications.MobileNetV2(input_shape=shape, alpha=alpha, weights=None, classes=num_classes,
                                          classifier_activation=None)
    return keras.Model(base.inputs, base.outputs, name=name)


def pad_images(x, size: int = 32, channels: int = 3):
    """Images ``[N, H, W, C]`` zero-padded (centred) to ``size x size`` and, when
    ``C == 1``, repeated to ``channels`` channels: 28x28x1 MNIST -> 32x32x3 for the
    MobileNets. Returns a float32 array; images larger than ``size`` raise ``ValueError``.

    >>> import numpy as np
    >>> y = pad_images(np.ones((2, 28, 28, 1)))
    >>> y.shape, float(y[0, 2, 2, 0]), float(y[0, 1, 2, 0]), float(y[:, 2:30, 2:30].min())
    ((2, 32, 32, 3), 1.0, 0.0, 1.0)
    """
    import numpy as np

    x = np.asarray(x, np.float32)
    if x.ndim != 4:
        raise ValueError(f"pad_images needs a batch of images [N, H, W, C], got shape {x.shape}.")
    n, h, w, c = x.shape
    if h > size or w > size:
        raise ValueError(f"pad_images: images of {h}x{w} do not fit in {size}x{size}.")
    if c not in (1, channels):
        raise ValueError(f"pad_images: images with {c} channels cannot become {channels} channels.")
    top, left = (size - h) // 2, (size - w) // 2
    out = np.zeros((n, size, size, channels), np.float32)
    out[:, top:top + h, left:left + w, :] = x
    return out


#: Names of the package's own builders (``list(FLOAT_MODELS)`` adds any registered since).
MODEL_NAMES: Tuple[str, ...] = tuple(FLOAT_MODELS)


def build_float_model(name: str, input_shape: Sequence[int] = (28, 28, 1),
                      num_classes: int = 10, **kwargs) -> keras.Model:
    """Build a float model by name: ``"mlp"`` (:func:`mlp`), ``"cnn"`` (:func:`small_cnn`,
    alias ``"small_cnn"``), ``"mobilenet_v1"``, ``"mobilenet_v2"`` or one added with
    :func:`register`. Extra keyword arguments go to the builder (e.g.
    ``hidden=(256, 256)`` for ``"mlp"``, ``alpha=0.5`` for the MobileNets).

    Raises:
        ValueError: an unknown name (the message lists the known ones).

    >>> build_float_model("mlp", (8,), 3, hidden=(4,)).output_shape
    (None, 3)
    >>> build_float_model("resnet")
    Traceback (most recent call last):
    ...
    ValueError: Unknown model 'resnet'. Known models: mlp, cnn, mobilenet_v1, mobilenet_v2.
    """
    return FLOAT_MODELS.lookup(name)(input_shape=input_shape, num_classes=num_classes, **kwargs)


build_model = deprecated_alias("keras_coherence.models.build_model", build_float_model)

"""Forward and hand-written backward passes of low-memory binary-network training.

Every backward pass here is an explicit ``tf.custom_gradient`` built only from ops that
the TFLite converter lowers to builtins (``MATMUL``/``FULLY_CONNECTED``, ``CONV_2D``,
``TRANSPOSE_CONV``, ``TRANSPOSE``, ``PAD``, ``SLICE``, ``REVERSE_V2``, ``SIGN``-free
``SELECT_V2``, ``CAST``, ``ABS``, ``MEAN``/``SUM``, ``MUL``/``ADD``/``DIV``,
``LOG``/``POW``/``ROUND``, comparisons, ``SPACE_TO_DEPTH``/``DEPTH_TO_SPACE``,
``REDUCE_MIN``): no ``tf.py_function`` and nothing that needs
the Flex delegate (autodiff's ``Conv2DBackpropFilter``, ``ReluGrad`` and friends).
The same code can therefore be traced into a TFLite *training* signature that runs in
the plain LiteRT interpreter.

Conventions (Wang et al., arXiv 2102.04270, §5.3 of the project spec):

* ``binary_sign(x)`` is ``+1`` for ``x >= 0`` and ``-1`` otherwise (larq's convention).
* A binary layer binarizes its *input* (larq style) with a straight-through estimator
  that passes the gradient where ``|x| <= 1``, and its kernel with
  ``sign(clip(w, -1, 1))`` whose gradient is masked by ``|w| <= 1``. The first layer
  of a network keeps its real input (``first_layer=True``).
* Which tensors a backward pass keeps, and in which precision, is set by a
  :class:`~keras_coherence.binary.config.LowMemoryConfig`.
"""
from __future__ import annotations

import math
from typing import Sequence

from keras_coherence._keras import tf
from keras_coherence.binary.config import LowMemoryConfig

__all__ = ["binary_sign", "pack_bits", "unpack_bits", "after", "scratch_budget", "batch_chunks",
           "chunk_examples", "conv_scratch_bytes",
           "po2_round", "round_gradient", "round_latent", "latent_weight",
           "binary_matmul", "binary_conv2d", "l1_normalize", "conv_input_grad",
           "conv_filter_grad", "same_padding", "max_pool2d"]

_LN2 = math.log(2.0)


# --------------------------------------------------------------------------------------
# Element-wise helpers
# --------------------------------------------------------------------------------------


def binary_sign(x):
    """``+1`` where ``x >= 0``, ``-1`` elsewhere, in ``x``'s dtype (no gradient)."""
    one = tf.ones_like(x)
    return tf.where(x >= 0, one, -one)


def _sign_from_bits(bits, dtype=tf.float32):
    """``+1``/``-1`` from a ``bool`` tensor of "is non-negative" bits."""
    one = tf.ones(tf.shape(bits), dtype)
    return tf.where(bits, one, -one)


def _fp16(x):
    return tf.cast(tf.cast(x, tf.float16), x.dtype)


# --------------------------------------------------------------------------------------
# How saved tensors are stored: bit-packed words, computed back in the backward pass
# --------------------------------------------------------------------------------------

#: Bit ``i`` of a packed word has weight ``2**i``; bit 31 is the sign bit, ``-2**31``.
_BIT_WEIGHTS = [1 << i for i in range(31)] + [-(1 << 31)]


def pack_bits(bits):
    """Packs a ``bool`` tensor ``[N, ...]`` into int32 words ``[N, ceil(size / 32)]``, 32
    elements of one example per word (element ``32 * j + i`` of the flattened example is
    bit ``i`` of word ``j``; the last word is zero-padded).

    Built from ``CAST``, ``MUL`` and ``SUM`` (TFLite builtins): the bit weights are
    distinct powers of two, so the sum is exact, and bit 31 weighs ``-2**31``.

    >>> unpack_bits(pack_bits(tf.constant([[True, False, True]])), [1, 3]).numpy().tolist()
    [[True, False, True]]
    """
    per_example = 1
    for d in bits.shape[1:]:
        per_example *= int(d)
    words = -(-per_example // 32)

    def pack(rows):  # int32 temporaries, 4 bytes per element: a chunk at a time
        flat = tf.reshape(tf.cast(rows, tf.int32), [-1, per_example])
        if words * 32 != per_example:
            flat = tf.pad(flat, [[0, 0], [0, words * 32 - per_example]])
        weighted = tf.reshape(flat, [-1, words, 32]) * tf.constant(_BIT_WEIGHTS, tf.int32)
        return tf.reduce_sum(weighted, axis=-1)

    chunks = batch_chunks(bits.shape[0], 2 * 4 * 32 * words)
    parts = [pack(take(bits, chunk)) for chunk in chunks]
    return parts[0] if len(parts) == 1 else tf.concat(parts, 0)


def unpack_bits(words, shape):
    """The ``bool`` tensor of ``shape`` that :func:`pack_bits` packed into ``words``
    (``RIGHT_SHIFT`` by 0..31, then ``FLOOR_MOD`` 2: an arithmetic shift keeps the sign,
    and the floor modulus of a negative word's shift is still its bit).

    The shifts are int32, 4 bytes per element; inside a :class:`scratch_budget` the rows
    are unpacked a chunk at a time, so that only the 1-byte ``bool`` result is whole.
    """
    shape = [int(d) if d is not None else -1 for d in shape]
    per_example = 1
    for d in shape[1:]:
        per_example *= d

    def unpack(rows):
        # (EXPAND_DIMS: a new axis by slicing is not a builtin when the batch is unknown)
        shifted = tf.bitwise.right_shift(tf.expand_dims(rows, -1), tf.range(32, dtype=tf.int32))
        flat = tf.reshape(tf.math.floormod(shifted, 2), [tf.shape(rows)[0], -1])
        if flat.shape[1] != per_example:  # the last word's padding bits
            flat = tf.slice(flat, [0, 0], [-1, per_example])
        return tf.equal(flat, 1)

    row_words = words.shape[1]
    chunks = batch_chunks(words.shape[0], 0 if row_words is None else 2 * 4 * 32 * int(row_words))
    parts = [unpack(take(words, chunk)) for chunk in chunks]
    return tf.reshape(parts[0] if len(parts) == 1 else tf.concat(parts, 0), shape)


def _zero_from(t, dtype):
    """A zero of ``dtype`` computed from ``t``'s first value (``|t[0]| < 0`` is never
    true, NaN included), so that whatever adds it runs after ``t`` exists."""
    first = tf.cast(tf.slice(tf.reshape(t, [-1]), [0], [1]), tf.float32)  # any dtype: words, indices
    return tf.cast(tf.abs(first) < 0, dtype)


def after(t, *dependencies):
    """``t`` itself, made to depend on the values of ``dependencies`` (``t`` plus a zero
    computed from each).

    The device graph runs its ops in one fixed order, and an op may be placed anywhere
    after its inputs exist. Two placements cost memory: a backward op that rebuilds a
    tensor from what the forward pass kept (unpacked bits, a kernel's signs) placed in
    the forward pass, whose float32 result then lives until its use; and a forward op
    that computes what is kept (packed bits) placed in the backward pass, whose float32
    input then lives until then. ``after(kept, dz)`` pins the first after the output
    gradient; ``after(small_forward_input, kept)`` pins the second before the forward
    result. Apply it to small tensors (packed words, kernels): it costs a copy of ``t``.
    """
    for dependency in dependencies:
        zero = _zero_from(dependency, tf.int32 if t.dtype == tf.bool else t.dtype)
        t = tf.logical_or(t, tf.cast(zero, tf.bool)) if t.dtype == tf.bool else t + zero
    return t


def po2_round(g, exponent_bits: int = 4, bias: int = 8):
    """Round a gradient tensor to signed powers of two with an ``exponent_bits`` exponent.

    One shift per tensor, ``b = bias - round(log2(max|g|))``; then each element
    ``v = g * 2**b`` becomes ``sign(v) * 2**clip(round(log2|v|), -2**(bits-1),
    2**(bits-1) - 1)`` and is shifted back by ``2**-b``. Zeros stay zero; an all-zero
    tensor is returned unchanged. (The exponent is rounded in the log domain, the
    paper's convention; ``pow`` keeps it TFLite-builtin, where the bit tricks of
    :mod:`keras_coherence.quantization._po2` would need ``BITCAST``.) With the paper's
    bias 8 the largest magnitudes land on ``2**8`` before the clip and saturate at
    ``2**7``: here 3 becomes 2, and tiny values floor at ``2**-8`` of the shifted scale.

    >>> po2_round(tf.constant([3.0, -0.3, 0.0, 1e-9])).numpy().tolist()
    [2.0, -0.25, 0.0, 6.103515625e-05]
    """
    g = tf.convert_to_tensor(g)
    lo, hi = -(2 ** (exponent_bits - 1)), 2 ** (exponent_bits - 1) - 1
    top = tf.reduce_max(tf.abs(g))
    safe_top = tf.where(top > 0, top, tf.ones_like(top))
    shift = float(bias) - tf.math.round(tf.math.log(safe_top) / _LN2)
    v = g * tf.pow(tf.constant(2.0, g.dtype), shift)
    mag = tf.abs(v)
    safe_mag = tf.where(mag > 0, mag, tf.ones_like(mag))
    e = tf.clip_by_value(tf.math.round(tf.math.log(safe_mag) / _LN2), float(lo), float(hi))
    sign = tf.where(v > 0, tf.ones_like(v), tf.where(v < 0, -tf.ones_like(v), tf.zeros_like(v)))
    return sign * tf.pow(tf.constant(2.0, g.dtype), e - shift)


def round_gradient(g, config: LowMemoryConfig):
    """``g`` rounded as ``config.activation_grad`` says (``float32`` leaves it alone)."""
    if config is None or config.activation_grad == "float32":
        return g
    if config.activation_grad == "float16":
        return _fp16(g)
    return po2_round(g, config.po2_exponent_bits, config.po2_bias)


def round_latent(x, config: LowMemoryConfig):
    """``x`` rounded to float16 values when ``config.latent_weights == "float16"``."""
    if config is not None and config.latent_weights == "float16":
        return _fp16(x)
    return x


def latent_weight(w, config: LowMemoryConfig):
    """A latent weight as the forward pass sees it: float16-rounded with a float16-rounded
    gradient when ``config.latent_weights == "float16"``, else ``w`` itself."""
    if config is None or config.latent_weights != "float16":
        return w

    @tf.custom_gradient
    def _fp16_latent(v):
        return _fp16(v), _fp16

    return _fp16_latent(w)


# --------------------------------------------------------------------------------------
# What a binary layer keeps for its backward pass
# --------------------------------------------------------------------------------------


def _saved_input(x, config, first_layer):
    """Returns ``(forward_input, restore, kept)``: ``restore(chunk, dz)`` rebuilds, in the
    backward pass (after ``dz``), ``(input used by the forward product, STE mask or
    None)`` for the examples of ``chunk`` (a ``slice`` of the batch) from ``kept``: the
    real input for a first layer; the packed sign and mask bits with
    ``binary_activation_retention`` (2 bits per element); else the float input."""
    if first_layer:
        return x, lambda chunk, dz: (take(x, chunk), None), []
    if config is not None and config.binary_activation_retention:
        sign_words = pack_bits(x >= 0)           # 1 bit per element
        mask_words = pack_bits(tf.abs(x) <= 1.0)  # 1 bit per element
        shape = x.shape

        def restore(chunk, dz):
            n = dz.shape[0]
            part = [n if n is not None else -1] + list(shape[1:])
            signs = unpack_bits(after(take(sign_words, chunk), dz), part)
            mask = unpack_bits(after(take(mask_words, chunk), dz), part)
            return _sign_from_bits(signs, x.dtype), tf.cast(mask, x.dtype)

        return binary_sign(x), restore, [sign_words, mask_words]

    def restore_float(chunk, dz):
        xc = after(take(x, chunk), dz)
        return binary_sign(xc), tf.cast(tf.abs(xc) <= 1.0, x.dtype)

    return binary_sign(x), restore_float, []


def _saved_kernel(w, x, kept):
    """Keeps ``sign(w)`` and the clip-STE mask ``|w| <= 1`` as packed bits; returns
    ``(sign(w), restore)`` with ``restore(dz) -> (sign(w), mask)`` rebuilt after ``dz``
    (so that neither the float32 latent kernel nor its signs live across the step).

    The forward ``sign(w)`` is computed after the layer's input ``x`` and after the
    packed words (the kernel's and ``kept``, the input's) exist: so every layer's float32
    signs are not computed at the start of the step, and no packing is left for the
    backward pass (which would keep its float32 input alive until then)."""
    flat = tf.reshape(w, [1, -1])
    sign_words, mask_words = pack_bits(flat >= 0), pack_bits(tf.abs(flat) <= 1.0)
    wb = binary_sign(after(w, x, sign_words, mask_words, *kept))

    def restore(dz):
        signs = unpack_bits(after(sign_words, dz), flat.shape)
        mask = unpack_bits(after(mask_words, dz), flat.shape)
        return (tf.reshape(_sign_from_bits(signs, w.dtype), w.shape),
                tf.reshape(tf.cast(mask, w.dtype), w.shape))

    return wb, restore


def _kernel_grad(dw, w_mask, config):
    """Kernel gradient: optionally ``sign(dW)/sqrt(N)``, then the clip-STE mask."""
    if config is not None and config.binarize_weight_grads:
        n = 1
        for d in dw.shape:
            n *= int(d)
        dw = binary_sign(dw) * (1.0 / math.sqrt(n))
    return dw * w_mask


#: Bytes of one kernel's scratch (CONV_2D's im2col buffer) that a convolution may use
#: while a device training graph is traced; None: no limit (one op for the whole batch).
_SCRATCH_BUDGET = [None]


class scratch_budget:
    """``with scratch_budget(nbytes):`` convolutions traced inside split their batch so
    that no single convolution's im2col buffer exceeds ``nbytes`` (the device training
    export does this: TFLite's ``CONV_2D`` with a non-constant filter allocates an
    im2col buffer of ``output pixels x batch x kh*kw*C_in`` floats). The arithmetic is
    the same; the kernel gradient is a sum over the chunks."""

    def __init__(self, nbytes):
        if nbytes is not None and (isinstance(nbytes, bool) or int(nbytes) < 1):
            raise ValueError(f"nbytes={nbytes!r} must be a positive number of bytes or None.")
        self.nbytes = None if nbytes is None else int(nbytes)

    def __enter__(self):
        self._previous = _SCRATCH_BUDGET[0]
        _SCRATCH_BUDGET[0] = self.nbytes
        return self

    def __exit__(self, *exc):
        _SCRATCH_BUDGET[0] = self._previous
        return False


def chunk_examples(batch, scratch_bytes_per_example, budget):
    """Examples in the first (largest) chunk when a batch of ``batch`` examples is split so
    that each chunk's scratch stays within ``budget`` bytes (None: the whole batch)."""
    if budget is None:
        return int(batch)
    per_chunk = max(1, int(budget // max(1, scratch_bytes_per_example)))
    count = -(-int(batch) // per_chunk)
    return -(-int(batch) // count)  # equal chunks, the last one smaller


def batch_chunks(batch, scratch_bytes_per_example):
    """``slice``s that split a batch of ``batch`` examples (a static size, or None) so that
    each chunk's scratch stays within the current :class:`scratch_budget`."""
    if batch is None or _SCRATCH_BUDGET[0] is None:
        return [slice(None)]
    size = chunk_examples(batch, scratch_bytes_per_example, _SCRATCH_BUDGET[0])
    return [slice(i, min(i + size, batch)) for i in range(0, batch, size)]


def take(t, chunk):
    """``t[chunk]`` along the batch (a ``slice`` from :func:`batch_chunks`) as one ``SLICE``;
    ``t`` itself for the whole batch.

    ``t[a:b]`` converts to ``STRIDED_SLICE``, which LiteRT runs element by element in its
    reference kernel; ``SLICE`` copies contiguous runs: cutting a ``[100, 30, 30, 64]``
    tensor into 13 parts (and summing them) took 52 vs 8.5 ms as float32 and 50 vs 4.3 ms
    as bool (``benchmarks/litert_slice.py``)."""
    if chunk == slice(None):
        return t
    start, stop = chunk.start or 0, chunk.stop
    rest = t.shape.rank - 1
    return tf.slice(t, [start] + [0] * rest, [stop - start] + [-1] * rest)


def conv_scratch_bytes(x_shape, kernel_shape, strides):
    """``(forward, backward)`` im2col bytes per example of a convolution of NHWC inputs
    ``x_shape`` with an HWIO kernel: LiteRT's ``CONV_2D`` with a non-constant filter makes
    an ``output pixels x kh*kw*C_in`` float32 buffer per example; the backward's input
    gradient (``H x W x kh*kw*C_out``) and kernel gradient convolutions, the larger."""
    h, w = int(x_shape[1]), int(x_shape[2])
    kh, kw, c_in, c_out = (int(d) for d in kernel_shape)
    rows, cols = -(-h // int(strides[0])), -(-w // int(strides[1]))
    forward = 4 * rows * cols * kh * kw * c_in
    return forward, max(4 * h * w * kh * kw * c_out, forward)


# --------------------------------------------------------------------------------------
# Binary dense
# --------------------------------------------------------------------------------------


def _read_after(kernel, x):
    """``kernel``'s value; a variable is read once the layer's input ``x`` exists (a
    control dependency). A read has no data input, so the device graph may otherwise
    read (and float16-round) every layer's kernel at the start of the step and keep the
    float32 copies until each layer runs: 52 MiB of BinaryNet's kernels at its forward
    peak."""
    if isinstance(kernel, tf.Variable) or hasattr(kernel, "read_value"):
        with tf.control_dependencies([x]):
            return tf.identity(kernel)
    return tf.convert_to_tensor(kernel)


def _fully_connected(a, b_t, transposed=()):
    """``a @ b_tᵀ`` as TFLite's ``FULLY_CONNECTED`` (weights laid out ``[out, in]``).

    Written any other way (``a @ b``, ``aᵀ @ b``) with a non-constant ``b``, the converter
    emits ``BATCH_MATMUL``, whose builtin kernel was measured 13x slower (52 vs 3.9 ms for
    ``[1000, 256] @ [256, 256]`` in LiteRT without XNNPACK). The operands named in
    ``transposed`` ("a", "b") are transposes: they are pinned (:func:`after`) so that the
    converter cannot fold them back into a ``BATCH_MATMUL``."""
    if "a" in transposed:
        a = after(a, b_t)
    if "b" in transposed:
        b_t = after(b_t, a)
    return tf.matmul(a, b_t, transpose_b=True)


def binary_matmul(x, kernel, config: LowMemoryConfig, first_layer: bool = False):
    """``sign(x) @ sign(clip(kernel))`` (``x @ ...`` for a first layer), low-memory backward.

    Backward with output gradient ``dz`` (after :func:`round_gradient`):
    ``dx = (dz @ Wbᵀ) * 1{|x|<=1}`` and ``dW = xbᵀ @ dz`` (optionally binarized, then
    masked by ``|W| <= 1``), where ``xb`` comes from the stored sign bits.
    """
    w_latent = latent_weight(_read_after(kernel, x), config)

    @tf.custom_gradient
    def _op(x, w):
        x_fwd, restore, kept = _saved_input(x, config, first_layer)
        wb, restore_kernel = _saved_kernel(w, x, kept)
        z = _fully_connected(x_fwd, tf.transpose(wb), transposed="b")

        def grad(dz):
            dz = round_gradient(dz, config)
            wb_saved, w_mask = restore_kernel(dz)
            x_saved, mask = restore(slice(None), dz)
            dx = _fully_connected(dz, wb_saved)
            if mask is not None:
                dx = dx * mask
            dw = _fully_connected(tf.transpose(x_saved), tf.transpose(dz), transposed="ab")
            return dx, _kernel_grad(dw, w_mask, config)

        return z, grad

    return _op(x, w_latent)


# --------------------------------------------------------------------------------------
# Binary conv2d (NHWC, HWIO kernels)
# --------------------------------------------------------------------------------------


def _pair(v):
    return (int(v), int(v)) if isinstance(v, (int,)) else tuple(int(a) for a in v)


def same_padding(size: int, k: int, stride: int):
    """``(before, after)`` zero padding TensorFlow's ``"SAME"`` uses along one axis."""
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    return total // 2, total - total // 2


def _explicit_padding(x_shape, ksize, strides, padding):
    if padding == "VALID":
        return (0, 0), (0, 0)
    return (same_padding(int(x_shape[1]), ksize[0], strides[0]),
            same_padding(int(x_shape[2]), ksize[1], strides[1]))


def conv_filter_grad(x, dz, ksize: Sequence[int], strides: Sequence[int], padding: str,
                     dilations: Sequence[int] = (1, 1)):
    """Kernel gradient of ``conv2d(x, W, strides, padding, dilations)`` as one forward
    convolution.

    The batch becomes the contraction (channel) axis: ``x`` transposed to
    ``[Cin, H, W, N]`` is convolved with ``dz`` transposed to ``[Ho, Wo, N, Cout]``,
    dilated by the stride (kernel tap ``i`` meets input row ``stride*o + dilation*i``, so
    a dilated kernel samples that correlation with step ``dilation``), and the
    ``[kh, kw]`` corner is kept -- no ``Conv2DBackpropFilter`` (a Flex op in TFLite).
    The stride dilation goes through ``tf.nn.convolution`` (``SpaceToBatchND`` + conv +
    ``BatchToSpaceND``, as Keras's ``Conv2D`` does): TensorFlow's non-oneDNN CPU
    ``Conv2D`` kernel has no dilation on CPUs without AVX-512.
    """
    kh, kw = ksize
    strides, dilations = tuple(strides), tuple(dilations)
    if strides != (1, 1) and dilations != (1, 1):
        raise ValueError(f"strides={strides} with dilations={dilations}: a convolution takes "
                         "strides > 1 or dilations > 1, not both.")
    (pt, pb), (pl, pr) = _explicit_padding(x.shape, _dilated_size(ksize, dilations), strides,
                                           padding)
    if pt or pb or pl or pr:
        x = tf.pad(x, [[0, 0], [pt, pb], [pl, pr], [0, 0]])
    xt = tf.transpose(x, [3, 1, 2, 0])
    dzt = tf.transpose(dz, [1, 2, 0, 3])
    if strides != (1, 1):
        out = tf.nn.convolution(xt, dzt, strides=1, padding="VALID", dilations=list(strides))
    else:  # taps ``dilation`` apart: a strided correlation (exactly kh x kw outputs)
        out = tf.nn.convolution(xt, dzt, strides=list(dilations), padding="VALID")
    out = tf.slice(out, [0, 0, 0, 0], [-1, kh, kw, -1])
    return tf.transpose(out, [1, 2, 0, 3])


def _dilated_size(ksize, dilations):
    """The extent ``(k - 1) * d + 1`` of a dilated kernel along each axis."""
    return tuple((int(k) - 1) * int(d) + 1 for k, d in zip(ksize, dilations))


def conv_input_grad(dz, kernel, x_shape, strides: Sequence[int], padding: str,
                    dilations: Sequence[int] = (1, 1)):
    """Input gradient of ``conv2d(x, kernel, strides, padding, dilations)``.

    Stride 1: a convolution of the zero-padded ``dz`` with the spatially reversed,
    in/out-transposed kernel, dilated as the forward one (``CONV_2D`` in TFLite; the
    dilation through ``tf.nn.convolution``, see :func:`conv_filter_grad`). Larger
    strides (no dilation): ``conv2d_transpose`` (``TRANSPOSE_CONV``).
    """
    kh, kw = int(kernel.shape[0]), int(kernel.shape[1])
    dilations = tuple(dilations)
    if tuple(strides) != (1, 1):
        if dilations != (1, 1):
            raise ValueError(f"strides={tuple(strides)} with dilations={dilations}: a "
                             "convolution takes strides > 1 or dilations > 1, not both.")
        out_shape = tf.concat([tf.shape(dz)[:1], tf.constant([int(d) for d in x_shape[1:]])], 0)
        return tf.nn.conv2d_transpose(dz, kernel, out_shape, strides=list(strides),
                                      padding=padding)
    eh, ew = _dilated_size((kh, kw), dilations)
    (pt, pb), (pl, pr) = _explicit_padding(x_shape, (eh, ew), strides, padding)
    dz = tf.pad(dz, [[0, 0], [eh - 1 - pt, eh - 1 - pb], [ew - 1 - pl, ew - 1 - pr], [0, 0]])
    flipped = tf.transpose(tf.reverse(kernel, [0, 1]), [0, 1, 3, 2])
    return tf.nn.convolution(dz, flipped, strides=1, padding="VALID", dilations=list(dilations))


def binary_conv2d(x, kernel, strides=(1, 1), padding="VALID",
                  config: LowMemoryConfig = None, first_layer: bool = False,
                  dilations=(1, 1)):
    """``conv2d(sign(x), sign(clip(kernel)))`` (real ``x`` for a first layer), with the
    low-memory backward of :func:`binary_matmul` written with forward convolutions.

    ``dilations > 1`` (atrous) needs ``strides == 1``, as Keras's ``Conv2D``; forward and
    backward go through ``tf.nn.convolution``, which runs on every CPU.
    """
    strides = _pair(strides)
    dilations = _pair(dilations)
    padding = padding.upper()
    if padding not in ("VALID", "SAME"):
        raise ValueError(f"padding={padding!r} must be 'valid' or 'same'.")
    if min(dilations) < 1:
        raise ValueError(f"dilations={dilations} must be >= 1.")
    if strides != (1, 1) and dilations != (1, 1):
        raise ValueError(f"strides={strides} with dilations={dilations}: a convolution takes "
                         "strides > 1 or dilations > 1, not both (as Keras's Conv2D).")
    w_latent = latent_weight(_read_after(kernel, x), config)
    x_shape = x.shape
    kh, kw = int(w_latent.shape[0]), int(w_latent.shape[1])
    if None in tuple(x_shape[1:3]):  # no static size: one convolution per batch
        forward_scratch = backward_scratch = 0
    else:
        forward_scratch, backward_scratch = conv_scratch_bytes(x_shape, w_latent.shape, strides)

    def conv(inputs, filters):
        return tf.nn.convolution(inputs, filters, strides=list(strides), padding=padding,
                                 dilations=list(dilations))

    @tf.custom_gradient
    def _op(x, w):
        x_fwd, restore, kept = _saved_input(x, config, first_layer)
        wb, restore_kernel = _saved_kernel(w, x, kept)
        chunks = batch_chunks(x.shape[0], forward_scratch)
        if len(chunks) == 1:
            z = conv(x_fwd, wb)
        else:  # each chunk's input made when the previous chunk is done: not all at once
            parts = []
            for chunk in chunks:
                x_part = take(x, chunk) if not parts else after(take(x, chunk), parts[-1])
                parts.append(conv(x_part if first_layer else binary_sign(x_part), wb))
            z = tf.concat(parts, 0)

        def grad(dz):
            dz = round_gradient(dz, config)
            wb_saved, w_mask = restore_kernel(dz)
            dxs, dw = [], None
            for chunk in batch_chunks(dz.shape[0], backward_scratch):
                dz_part = take(dz, chunk)
                x_saved, mask = restore(chunk, dz_part)
                dx = conv_input_grad(dz_part, wb_saved, x_shape, strides, padding, dilations)
                dxs.append(dx if mask is None else dx * mask)
                part = conv_filter_grad(x_saved, dz_part, (kh, kw), strides, padding, dilations)
                dw = part if dw is None else dw + part
            dx = dxs[0] if len(dxs) == 1 else tf.concat(dxs, 0)
            return dx, _kernel_grad(dw, w_mask, config)

        return z, grad

    return _op(x, w_latent)


# --------------------------------------------------------------------------------------
# l1 batch norm
# --------------------------------------------------------------------------------------


def l1_normalize(x, mean, sigma, config: LowMemoryConfig, beta=None):
    """Training-mode l1 batch norm: ``x_hat = (x - mean) / sigma`` (``+ beta`` if given).

    ``mean`` and ``sigma`` are the batch's per-channel mean and mean absolute deviation
    (treated as constants by autodiff; the backward below accounts for them). The
    backward keeps only ``sign(x_hat)`` (packed bits) and ``s = mean|x_hat|`` per channel:

    ``d = round(dy) / sigma;  dx = d - mean(d) - sign(x_hat) * mean(d * sign(x_hat)) * s``

    with means over every axis but the last (batch and spatial), and ``dbeta = sum(dy)``.
    It is written for the device graph's arena: ``beta``'s gradient is taken first, so
    that ``dy`` can be freed, and the signs are selects, never a float32 tensor.
    """
    axes = list(range(len(x.shape) - 1))
    with_beta = beta is not None
    if not with_beta:
        beta = tf.zeros([int(x.shape[-1])], x.dtype)  # its gradient is not used

    @tf.custom_gradient
    def _op(x, mean, sigma, beta):
        x_hat = (x - mean) / sigma
        sign_words = pack_bits(x_hat >= 0)      # 1 bit per element
        s = tf.reduce_mean(tf.abs(x_hat), axis=axes, keepdims=True)
        # pack and s in the forward pass, so that x_hat is not kept for them (see after)
        shift = after(beta, sign_words, s)

        def grad(dy):
            dbeta = tf.reduce_sum(dy, axis=axes)
            d = round_gradient(dy, config) / after(sigma, dbeta)
            positive = unpack_bits(after(sign_words, d), x_hat.shape)
            mean_d = tf.reduce_mean(d, axis=axes, keepdims=True)
            # mean(d * sign) = 2 mean(d where positive) - mean(d)
            c = (2.0 * tf.reduce_mean(tf.where(positive, d, 0.0), axis=axes, keepdims=True)
                 - mean_d) * s
            dx = d - tf.where(positive, mean_d + c, mean_d - c)
            return dx, tf.zeros_like(mean), tf.zeros_like(sigma), dbeta

        return (x_hat + shift if with_beta else after(x_hat, sign_words, s)), grad

    return _op(x, mean, sigma, beta)


# --------------------------------------------------------------------------------------
# Max pooling (square, non-overlapping windows)
# --------------------------------------------------------------------------------------


def pad_or_crop_hw(t, edges, value=0.0):
    """Pads (positive) or crops (negative) the H and W axes of NHWC ``t`` (static H, W) by
    ``edges = ((top, bottom), (left, right))``, padding with ``value``."""
    crop = [(max(-a, 0), max(-b, 0)) for a, b in edges]
    if any(a or b for a, b in crop):
        h, w = int(t.shape[1]), int(t.shape[2])
        t = tf.slice(t, [0, crop[0][0], crop[1][0], 0],
                     [-1, h - crop[0][0] - crop[0][1], w - crop[1][0] - crop[1][1], -1])
    pad = [[0, 0]] + [[max(a, 0), max(b, 0)] for a, b in edges] + [[0, 0]]
    if any(a or b for a, b in pad):
        t = tf.pad(t, pad, constant_values=value)
    return t


def max_pool2d(x, pool_size: int, padding: str = "VALID"):
    """``tf.nn.max_pool2d(x, pool_size, pool_size, padding)`` (NHWC) whose backward keeps
    only the argmax index of each window (``uint8``) instead of ``x``.

    Windows are ``pool_size x pool_size`` with stride ``pool_size`` (no overlap). The
    forward is TF's ``MaxPool`` (``MAX_POOL_2D``). For the backward, ``SPACE_TO_DEPTH``
    lays each window out along the channel axis, the index of the *first* element equal
    to the window's maximum (row-major window order) is kept, and the gradient goes to
    that element only, laid back out with ``DEPTH_TO_SPACE`` -- on ties this is the
    element that TF's ``MaxPoolGrad`` picks, without that op (which has no TFLite
    builtin). ``"VALID"`` drops the bottom/right rows and columns that fill no window
    (they get zero gradient); ``"SAME"`` pads them to whole windows as TF does, with the
    dtype's lowest value.

    >>> x = tf.constant([[1.0, 3.0], [3.0, 2.0]])[None, :, :, None]
    >>> with tf.GradientTape() as tape:
    ...     tape.watch(x)
    ...     y = max_pool2d(x, 2)
    >>> y.numpy().ravel().tolist(), tape.gradient(y, x).numpy().ravel().tolist()
    ([3.0], [0.0, 1.0, 0.0, 0.0])
    """
    k = int(pool_size)
    if not 2 <= k <= 15:
        raise ValueError(f"pool_size={pool_size!r} must be in [2, 15] (the index, up to k*k, is a uint8).")
    padding = padding.upper()
    if padding not in ("VALID", "SAME"):
        raise ValueError(f"padding={padding!r} must be 'valid' or 'same'.")
    x = tf.convert_to_tensor(x)
    if x.shape.rank != 4 or x.shape[1] is None or x.shape[2] is None or x.shape[3] is None:
        raise ValueError(f"max_pool2d needs NHWC inputs with static H, W, C; got shape {x.shape}.")
    size = (int(x.shape[1]), int(x.shape[2]))
    if padding == "VALID":
        if min(size) < k:
            raise ValueError(f"a {k}x{k} 'valid' pool needs inputs of at least {k}x{k}; got {size}.")
        edges = [(0, (s // k) * k - s) for s in size]   # crop what fills no window
    else:
        edges = [same_padding(s, k, k) for s in size]
    channels = int(x.shape[3])
    window_index = tf.constant(list(range(k * k)), tf.int32, shape=(1, k * k, 1))

    @tf.custom_gradient
    def _op(x):
        y = tf.nn.max_pool2d(x, k, k, padding)
        # [B*Ho*Wo, k*k, C]: one row per window, its elements in row-major order
        xw = pad_or_crop_hw(x, edges, x.dtype.min)
        windows = tf.reshape(tf.nn.space_to_depth(xw, k), [-1, k * k, channels])
        is_max = tf.equal(windows, tf.reshape(y, [-1, 1, channels]))
        first = tf.reduce_min(tf.where(is_max, window_index, k * k), axis=1)
        argmax = tf.cast(first, tf.uint8)           # what the backward keeps
        y = after(y, argmax)  # the index in the forward pass: x is not kept for it

        def grad(dy):
            # compared as int32: LiteRT's EQUAL aborts on uint8 operands
            hit = tf.equal(tf.cast(tf.reshape(argmax, [-1, 1, channels]), tf.int32),
                           window_index)
            dw = tf.where(hit, tf.reshape(dy, [-1, 1, channels]), tf.zeros([], dy.dtype))
            out_shape = tf.concat([tf.shape(dy)[:3], [k * k * channels]], 0)
            dx = tf.nn.depth_to_space(tf.reshape(dw, out_shape), k)
            return pad_or_crop_hw(dx, [(-a, -b) for a, b in edges], 0.0)

        return y, grad

    return _op(x)

"""Power-of-two (PO2) weight quantizers from "A Closer Look at Hardware-Friendly Weight
Quantization" (Bae, Zielinski, Chatterjee, arXiv 2210.03671), plus the QKeras
``quantized_bits(alpha="auto_po2")`` baseline.

| alias | class | how the exponent is chosen |
|---|---|---|
| ``"msqe_po2_baseline"`` | ``MSQEPo2Baseline`` | QKeras auto_po2: max init, 5 least-squares steps, every call |
| ``"msqe_po2"`` | ``MSQEPo2`` | outlier-masked, gradient-weighted MSQE: 3 LS steps (keep best) + line search |
| ``"learned_po2"`` | ``LearnedPo2`` | trainable real log2-scale (TQT), rounded by ceil / round / lower-MSQE |

All share ``Q(x) = 2**e * clip(round_half_to_even(x / 2**e), -qp, qp)`` with
``qp = 2**(bits-1) - 1`` and a straight-through gradient that is zero for clipped
elements; see ``keras_coherence.quantization.base``.

>>> import numpy as np
>>> from keras_coherence.quantization import quantizers
>>> q = quantizers.get("msqe_po2")
>>> w = tf.constant(np.linspace(-1.0, 1.0, 9, dtype="float32").reshape(3, 3))
>>> y = q(w, training=True)
>>> int(q.exponent().numpy().ravel()[0]), q.integer_codes(w).numpy().ravel().tolist()
(-2, [-4, -3, -2, -1, 0, 1, 2, 3, 4])
>>> quantizers.serialize(q)["registered_name"]
'keras_coherence>MSQEPo2'
"""
from keras_coherence._keras import keras, tf
from keras_coherence._registry import Registry
from keras_coherence.quantization import _po2
from keras_coherence.quantization.base import PO2Quantizer

__all__ = ["MSQEPo2Baseline", "MSQEPo2", "LearnedPo2", "get", "serialize", "deserialize"]


class MSQEPo2Baseline(PO2Quantizer):
    """QKeras ``quantized_bits(bits, 0, 1, alpha="auto_po2")`` with its exponent stored.

    The scale search is QKeras's, step for step: start from ``po2(max|x| / qp)``,
    then ``iterations`` times quantize with ``floor(|x| / s + 0.5)`` (saturated at
    ``qp``) and refit ``s = po2(mean(x q) / (mean(q q) + 1e-7))`` with
    ``po2(v) = 2**round(log2(v + 1e-7))``. It runs on every call, training or not,
    as in QKeras, until ``freeze()``. Training calls store the exponent.

    Differences from QKeras, all deliberate: the final codes use round-half-to-even
    (QKeras rounds ties away from zero; results differ only on exact ties), the
    gradient is zero for clipped elements (QKeras passes 1 everywhere), and the
    default is one exponent per tensor. ``per_channel=True`` gives QKeras's
    per-output-channel scales (QKeras's ``quantized_bits`` is always per channel;
    for rank-1 tensors it starts all channels from the tensor maximum, this class
    from each element's own maximum).

    >>> q = MSQEPo2Baseline(bits=4)
    >>> y = q(tf.constant([0.1, -0.35, 0.7, 0.02]), training=True)
    >>> int(q.exponent().numpy()[0]), y.numpy().tolist()
    (-3, [0.125, -0.375, 0.75, 0.0])
    >>> q.freeze()  # stop recomputing; later calls use the stored exponent
    >>> q(tf.constant([3.0]), training=False).numpy().tolist()  # clipped at 7 * 2**-3
    [0.875]

    Args:
        bits, per_channel, channel_axis, check_numerics: see ``PO2Quantizer``.
        iterations: least-squares refits (QKeras uses 5).
    """

    def __init__(self, bits=4, per_channel=False, channel_axis=-1, iterations=5, check_numerics=True, **kwargs):
        super().__init__(bits, per_channel, channel_axis, check_numerics, **kwargs)
        self.iterations = int(iterations)

    def search(self, x, axes):
        """QKeras's auto_po2 exponent for ``x`` (pure function)."""
        qp = self.qp
        e = _po2.po2_exponent(tf.reduce_max(tf.abs(x), axis=axes, keepdims=True) / qp)
        for _ in range(self.iterations):
            v = tf.floor(tf.abs(x) / _po2.pow2(e) + 0.5)
            q = tf.sign(x) * tf.minimum(v, qp)
            num = tf.reduce_mean(x * q, axis=axes, keepdims=True)
            den = tf.reduce_mean(q * q, axis=axes, keepdims=True)
            e = _po2.po2_exponent(num / (den + _po2.EPS))
        return e

    def _calibrated_exponent(self, x, state):
        return self.search(x, self.reduce_axes(x.shape))

    def _quantize(self, x, training, state):
        stored = state["exponent"]
        e = tf.cond(
            self._flag(state["frozen"]),
            lambda: tf.convert_to_tensor(stored),
            lambda: self._calibrated_exponent(x, state),
        )
        if training:
            self._store(state, e)
        return _po2.ste_quantize(x, e, self.qp), _po2.inside_mask(x, e, self.qp)

    def get_config(self):
        return {**super().get_config(), "iterations": self.iterations}


class MSQEPo2(PO2Quantizer):
    """MSQE-optimal PO2 quantizer with the fixes of Bae et al. (2022), each switchable.

    In every training call (unless frozen) the exponent is searched again, starting
    from the stored one (the first call starts from ``po2(max|x| / qp)``, the max
    taken over the elements with nonzero weight, so outliers do not set the start):

    1. weights ``w`` of the squared error: ``sqrt(m2)`` (or ``m2``) when
       ``use_second_moments``, times the outlier mask ``|x| <= outlier_sigma * std(x)``
       when ``outlier_mask`` (std over the elements that share an exponent). A
       channel whose weights are all zero (e.g. a constant channel, whose std is 0)
       falls back to unit weights.
    2. ``ls_iterations`` weighted least-squares refits
       ``e = po2(sum(w x q) / sum(w q q))``, each from the codes of the previous
       refit; the exponent with the lowest weighted MSQE (start included) is kept.
    3. line search: exponents ``best + d`` for ``d`` in ``±1..±line_search_radius``
       (nearest first, lower first); a candidate replaces the best only if its
       weighted MSQE is strictly lower.
    4. optional stable exponent: with ``stable_exponent=True`` an EMA (``stable_decay``)
       of the searched exponent is kept in ``stable_exponent``, updated while
       ``update_stable`` is 1 and ``use_stable`` is 0; once ``use_stable`` is 1
       (``switch_to_stable_exponent()``) the quantizer uses ``round(stable_exponent)``.

    ``m2`` is the EMA (decay ``second_moment_decay``, created as ones) of the squared
    upstream gradient of the unclipped elements, updated in the backward pass of
    training calls only (under ``MirroredStrategy``: the replica mean of the
    per-replica squared gradients). With ``training=False`` the stored exponent is used; a
    quantizer that never ran in training searches (without storing).

    >>> q = MSQEPo2(bits=4, use_second_moments=False, outlier_min_size=0)  # mask even 5 weights
    >>> x = tf.constant([0.1, -0.35, 0.7, 0.02, 5.0])   # 5.0 is an outlier
    >>> y = q(x, training=True)
    >>> int(q.exponent().numpy()[0]), y.numpy().tolist()
    (-3, [0.125, -0.375, 0.75, 0.0, 0.875])
    >>> q(x, training=False).numpy().tolist() == y.numpy().tolist()
    True

    Args:
        bits, per_channel, channel_axis, check_numerics: see ``PO2Quantizer``.
        outlier_mask: exclude ``|x| > outlier_sigma * std`` from the fit.
        outlier_sigma: the outlier threshold in standard deviations (2.0).
        outlier_min_size: no mask for exponents shared by fewer elements (16). A
            3x3 depthwise kernel quantized per channel has 9 weights per exponent;
            masking at 2 sigma there drops (and then clips) each channel's dominant
            tap: MobileNetV2 fell from 71.2% to 59.9% before QAT with the mask.
        use_second_moments: weight the squared error by the gradient second moment.
        second_moment_decay: EMA decay of ``m2`` (0.999).
        sqrt_weight: weight by ``sqrt(m2)`` instead of ``m2``.
        ls_iterations: least-squares refits (3).
        line_search_radius: exponents searched on each side of the LS result (3; 0 = off).
        stable_exponent: keep the stable-exponent EMA and its switch variables.
        stable_decay: EMA decay of the stable exponent (0.99).
    """

    def __init__(
        self,
        bits=4,
        per_channel=False,
        channel_axis=-1,
        outlier_mask=True,
        outlier_sigma=2.0,
        outlier_min_size=16,
        use_second_moments=True,
        second_moment_decay=0.999,
        sqrt_weight=True,
        ls_iterations=3,
        line_search_radius=3,
        stable_exponent=False,
        stable_decay=0.99,
        check_numerics=True,
        **kwargs,
    ):
        super().__init__(bits, per_channel, channel_axis, check_numerics, **kwargs)
        self.outlier_mask = bool(outlier_mask)
        self.outlier_sigma = float(outlier_sigma)
        self.outlier_min_size = int(outlier_min_size)
        self.use_second_moments = bool(use_second_moments)
        self.second_moment_decay = float(second_moment_decay)
        self.sqrt_weight = bool(sqrt_weight)
        self.ls_iterations = int(ls_iterations)
        self.line_search_radius = int(line_search_radius)
        self.stable_exponent = bool(stable_exponent)
        self.stable_decay = float(stable_decay)
        if self.ls_iterations < 0 or self.line_search_radius < 0:
            raise ValueError("ls_iterations and line_search_radius must be >= 0")

    def _create_extra_state(self, shape, exp_shape, add):
        state = {}
        if self.use_second_moments:
            state["m2"] = add("m2", self._m2_shape(shape), 1.0, aggregation=tf.VariableAggregation.MEAN)
        if self.stable_exponent:
            state["stable_exponent"] = add("stable_exponent", exp_shape)
            state["use_stable"] = add("use_stable", [])
            state["update_stable"] = add("update_stable", [], 1.0)
        return state

    # ------------------------------------------------------------- the search
    def _masks_groups_of(self, shape, axes):
        """Whether the outlier mask applies: groups sharing an exponent are large enough."""
        dims = [shape[a] for a in axes]
        return any(d is None for d in dims) or _num_elements(dims) >= self.outlier_min_size

    def msqe_weight(self, x, axes, state):
        """Per-element weights of the squared error, or None for unweighted."""
        w = None
        if self.use_second_moments:
            m2 = tf.convert_to_tensor(state["m2"])
            w = (tf.sqrt(m2) if self.sqrt_weight else m2) * tf.ones_like(x)
        if self.outlier_mask and self._masks_groups_of(x.shape, axes):
            std = tf.math.reduce_std(x, axis=axes, keepdims=True)
            mask = tf.cast(tf.abs(x) <= self.outlier_sigma * std, x.dtype)
            w = mask if w is None else w * mask
        if w is not None:
            total = tf.reduce_sum(w, axis=axes, keepdims=True)
            w = tf.where(total > 0.0, w, tf.ones_like(w))
        return w

    def search(self, x, e0, weight, axes):
        """Least squares (keep best) then line search, from the start exponent ``e0``."""
        qp = self.qp
        best_e, best_err = e0, _po2.wmsqe(x, e0, qp, axes, weight)
        e = e0
        for _ in range(self.ls_iterations):
            e = _po2.least_squares_exponent(x, _po2.codes(x, e, qp), axes, weight)
            err = _po2.wmsqe(x, e, qp, axes, weight)
            better = err < best_err
            best_e, best_err = tf.where(better, e, best_e), tf.where(better, err, best_err)
        center = best_e
        for d in range(1, self.line_search_radius + 1):
            for cand in (center - d, center + d):
                err = _po2.wmsqe(x, cand, qp, axes, weight)
                better = err < best_err
                best_e, best_err = tf.where(better, cand, best_e), tf.where(better, err, best_err)
        return best_e

    def initial_exponent(self, x, axes, weight=None):
        """``po2(max|x| / qp)`` over the elements with nonzero weight (outliers excluded)."""
        ax = tf.abs(x) if weight is None else tf.where(weight > 0.0, tf.abs(x), tf.zeros_like(x))
        return _po2.po2_exponent(tf.reduce_max(ax, axis=axes, keepdims=True) / self.qp)

    def _searched_exponent(self, x, axes, state):
        w = self.msqe_weight(x, axes, state)
        e0 = tf.where(
            self._flag(state["initialized"]), tf.convert_to_tensor(state["exponent"]), self.initial_exponent(x, axes, w)
        )
        return self.search(x, e0, w, axes)

    def _calibrated_exponent(self, x, state):
        e = self._searched_exponent(x, self.reduce_axes(x.shape), state)
        if self.stable_exponent:
            stable = tf.math.round(tf.convert_to_tensor(state["stable_exponent"]))
            e = tf.where(self._flag(state["use_stable"]), stable, e)
        return e

    def _calibrate(self, x, state):
        super()._calibrate(x, state)
        if self.stable_exponent:
            state["stable_exponent"].assign(state["exponent"])

    # ------------------------------------------------------------ the forward
    def _quantize(self, x, training, state):
        axes = self.reduce_axes(x.shape)
        stored = state["exponent"]
        if not training:
            use_stored = tf.logical_or(self._flag(state["frozen"]), self._flag(state["initialized"]))
            e = tf.cond(use_stored, lambda: tf.convert_to_tensor(stored), lambda: self._searched_exponent(x, axes, state))
            return _po2.ste_quantize(x, e, self.qp), _po2.inside_mask(x, e, self.qp)

        # Only pure computations inside the cond: variables are written outside of
        # control flow (MirroredStrategy cannot sync a write inside a cond).
        frozen = self._flag(state["frozen"])
        e = tf.cond(frozen, lambda: tf.convert_to_tensor(stored), lambda: self._searched_exponent(x, axes, state))
        if self.stable_exponent:
            stable = state["stable_exponent"]
            switched = self._flag(state["use_stable"])
            ema = tf.where(
                self._flag(state["initialized"]), self.stable_decay * stable + (1.0 - self.stable_decay) * e, e
            )
            update_ema = tf.logical_and(
                self._flag(state["update_stable"]), tf.logical_not(tf.logical_or(switched, frozen))
            )
            new_stable = tf.where(update_ema, ema, tf.convert_to_tensor(stable))
            stable.assign(new_stable)
            e = tf.where(tf.logical_and(switched, tf.logical_not(frozen)), tf.math.round(new_stable), e)
        self._store(state, e)
        return _po2.ste_quantize(x, e, self.qp), _po2.inside_mask(x, e, self.qp)

    @property
    def _tracks_m2(self):
        return self.use_second_moments

    def switch_to_stable_exponent(self, state=None):
        """Uses ``round(stable_exponent)`` from now on (and stops its EMA)."""
        state = self._resolve(state)
        if not self.stable_exponent:
            raise ValueError(f"{self.name}: built with stable_exponent=False")
        state["use_stable"].assign(1.0)
        state["exponent"].assign(tf.math.round(state["stable_exponent"]))

    def get_config(self):
        config = {
            "outlier_mask": self.outlier_mask,
            "outlier_sigma": self.outlier_sigma,
            "outlier_min_size": self.outlier_min_size,
            "use_second_moments": self.use_second_moments,
            "second_moment_decay": self.second_moment_decay,
            "sqrt_weight": self.sqrt_weight,
            "ls_iterations": self.ls_iterations,
            "line_search_radius": self.line_search_radius,
            "stable_exponent": self.stable_exponent,
            "stable_decay": self.stable_decay,
        }
        return {**super().get_config(), **config}


_ROUNDINGS = ("ceil", "round", "msqe")


class LearnedPo2(PO2Quantizer):
    """Gradient-based PO2 quantizer: a trainable real log2-scale ``e`` (TQT-style).

    * init (first call, guarded by the ``initialized`` variable):
      ``e = log2(max(init_sigmas * std(x) / qp, min_init_scale))``; a channel with
      zero spread (constant) uses ``max|x| / qp`` instead of ``3 std / qp``.
    * integer exponent ``e_int`` by ``rounding``: ``"ceil"``, ``"round"`` (half to
      even) or ``"msqe"`` (Round-to-Lower-MSQE: ``floor(e)`` if its weighted MSQE is
      strictly lower than ``ceil(e)``'s, else ``ceil(e)``; weights ``sqrt(m2)`` times
      the mask ``|x| <= 2**e * (qp + 0.5)``, as in ``MSQEPo2``).
    * forward ``Q(x)`` with ``s = 2**e_int``; backward: straight-through on the
      exponent (``e + stop_gradient(e_int - e)``), so
      ``dQ/de = ln2 * s * (round(x/s) - x/s)`` for unclipped and
      ``ln2 * s * (+-qp)`` for clipped elements, and ``dQ/dx`` is 1 / 0 as usual.
      ``lsq_grad_scale=True`` multiplies ``e``'s gradient by ``1 / sqrt(N * qp)``
      (``N`` elements per exponent, as LSQ does).
    * ``exponent`` stores ``e_int`` of the last training call. With
      ``training=False`` ``e_int`` is recomputed from the current ``e`` (nothing is
      written), or taken from ``exponent`` once frozen. Frozen quantizers pass no
      gradient to ``e``.

    >>> q = LearnedPo2(bits=4, rounding="ceil", name="lq")
    >>> x = tf.constant([0.1, -0.35, 0.7, 0.02])
    >>> with tf.GradientTape() as tape:
    ...     y = q(x, training=True)
    ...     loss = tf.reduce_sum((y - x) ** 2)
    >>> [v.name for v in q.trainable_weights]
    ['lq/log2_scale:0']
    >>> round(float(q.log2_scale[0]), 2), int(q.exponent().numpy()[0])  # 3-sigma init, ceil
    (-2.63, -2)
    >>> y.numpy().tolist()
    [0.0, -0.25, 0.75, 0.0]
    >>> tape.gradient(loss, q.log2_scale).shape
    TensorShape([1])

    Args:
        bits, per_channel, channel_axis, check_numerics: see ``PO2Quantizer``.
        rounding: ``"ceil"``, ``"round"`` or ``"msqe"``.
        use_second_moments, second_moment_decay, sqrt_weight, outlier_mask: the
            weights of the ``"msqe"`` rounding (ignored otherwise).
        init_sigmas: the ``3`` of the 3-sigma initialization.
        min_init_scale: floor of the initial scale (1e-5; all-zero tensors).
        lsq_grad_scale: scale ``e``'s gradient by ``1 / sqrt(N * qp)``.
    """

    def __init__(
        self,
        bits=4,
        per_channel=False,
        channel_axis=-1,
        rounding="msqe",
        use_second_moments=True,
        second_moment_decay=0.999,
        sqrt_weight=True,
        outlier_mask=True,
        init_sigmas=3.0,
        min_init_scale=1e-5,
        lsq_grad_scale=False,
        check_numerics=True,
        **kwargs,
    ):
        super().__init__(bits, per_channel, channel_axis, check_numerics, **kwargs)
        if rounding not in _ROUNDINGS:
            raise ValueError(f"rounding must be one of {_ROUNDINGS}, got {rounding!r}")
        if not min_init_scale > 0.0:
            raise ValueError(f"min_init_scale must be > 0, got {min_init_scale!r}")
        self.rounding = rounding
        self.use_second_moments = bool(use_second_moments)
        self.second_moment_decay = float(second_moment_decay)
        self.sqrt_weight = bool(sqrt_weight)
        self.outlier_mask = bool(outlier_mask)
        self.init_sigmas = float(init_sigmas)
        self.min_init_scale = float(min_init_scale)
        self.lsq_grad_scale = bool(lsq_grad_scale)

    @property
    def _tracks_m2(self):
        return self.rounding == "msqe" and self.use_second_moments

    def _create_extra_state(self, shape, exp_shape, add):
        state = {"log2_scale": add("log2_scale", exp_shape, trainable=True, aggregation=tf.VariableAggregation.MEAN)}
        if self._tracks_m2:
            state["m2"] = add("m2", self._m2_shape(shape), 1.0, aggregation=tf.VariableAggregation.MEAN)
        return state

    @property
    def log2_scale(self):
        """The trainable real exponent ``e`` (a variable)."""
        return self._resolve(None)["log2_scale"]

    def initial_log2_scale(self, x, axes):
        std = tf.math.reduce_std(x, axis=axes, keepdims=True)
        spread = tf.where(std > 0.0, self.init_sigmas * std, tf.reduce_max(tf.abs(x), axis=axes, keepdims=True))
        return _po2.log2(tf.maximum(spread / self.qp, self.min_init_scale))

    def msqe_weight(self, x, e_real, state):
        w = None
        if self._tracks_m2:
            m2 = tf.convert_to_tensor(state["m2"])
            w = (tf.sqrt(m2) if self.sqrt_weight else m2) * tf.ones_like(x)
        if self.outlier_mask:
            mask = tf.cast(tf.abs(x) <= tf.pow(2.0, e_real) * (self.qp + 0.5), x.dtype)
            w = mask if w is None else w * mask
        return w

    def integer_exponent(self, e_real, x, axes, state):
        """``e_int`` from the real exponent by the configured rounding (no gradient)."""
        e_real = tf.stop_gradient(e_real)
        if self.rounding == "ceil":
            return tf.math.ceil(e_real)
        if self.rounding == "round":
            return tf.math.round(e_real)
        w = self.msqe_weight(x, e_real, state)
        if w is not None:
            total = tf.reduce_sum(w, axis=axes, keepdims=True)
            w = tf.where(total > 0.0, w, tf.ones_like(w))
        lo, hi = tf.math.floor(e_real), tf.math.ceil(e_real)
        err_lo = _po2.wmsqe(x, lo, self.qp, axes, w)
        err_hi = _po2.wmsqe(x, hi, self.qp, axes, w)
        return tf.where(err_lo < err_hi, lo, hi)

    def _real_exponent(self, x, axes, state):
        """Current ``e``; an uninitialized quantizer uses the 3-sigma init (not stored)."""
        return tf.where(
            self._flag(state["initialized"]),
            tf.convert_to_tensor(state["log2_scale"]),
            self.initial_log2_scale(x, axes),
        )

    def _calibrated_exponent(self, x, state):
        axes = self.reduce_axes(x.shape)
        return self.integer_exponent(self._real_exponent(x, axes, state), x, axes, state)

    def _calibrate(self, x, state):
        axes = self.reduce_axes(x.shape)
        state["log2_scale"].assign(self._real_exponent(x, axes, state))
        super()._calibrate(x, state)

    def _quantize(self, x, training, state):
        axes = self.reduce_axes(x.shape)
        var = state["log2_scale"]
        qp = self.qp
        if training:  # lazy 3-sigma init (an unconditional write: no cond around it)
            var.assign(self._real_exponent(x, axes, state))
            e_real = tf.convert_to_tensor(var)
        else:
            e_real = self._real_exponent(x, axes, state)

        frozen = self._flag(state["frozen"])
        e_int = tf.where(frozen, tf.convert_to_tensor(state["exponent"]), self.integer_exponent(e_real, x, axes, state))
        e_int = tf.stop_gradient(e_int)
        if training:
            self._store(state, e_int)

        # s = 2**e_int exactly in the forward pass; ds/de = ln2 * s (times the LSQ factor).
        s_int = tf.stop_gradient(_po2.pow2(e_int))
        de = (e_real - tf.stop_gradient(e_real)) * (1.0 - tf.cast(frozen, tf.float32))
        if self.lsq_grad_scale:
            n = tf.cast(tf.size(x), tf.float32) / float(max(1, _num_elements(e_int.shape)))
            de = de / tf.sqrt(n * qp)
        s = s_int * (1.0 + _po2.LN2 * de)

        xs = x / s
        r_int = tf.stop_gradient(tf.math.round(xs))
        inside = tf.abs(r_int) <= qp
        r = r_int + (xs - tf.stop_gradient(xs))
        y = s * tf.where(inside, r, tf.clip_by_value(r_int, -qp, qp))
        return y, tf.cast(inside, tf.float32)

    def get_config(self):
        config = {
            "rounding": self.rounding,
            "use_second_moments": self.use_second_moments,
            "second_moment_decay": self.second_moment_decay,
            "sqrt_weight": self.sqrt_weight,
            "outlier_mask": self.outlier_mask,
            "init_sigmas": self.init_sigmas,
            "min_init_scale": self.min_init_scale,
            "lsq_grad_scale": self.lsq_grad_scale,
        }
        return {**super().get_config(), **config}


def _num_elements(shape):
    n = 1
    for d in shape:
        n *= int(d)
    return n


# ------------------------------------------------------------------ registry
#: Quantizer classes by alias (their class names are accepted too): ``get``, Keras
#: deserialization and the command line read it, :func:`register` adds to it.
ALIASES = Registry("quantizer")
#: ``quantize_model(method=...)`` / ``--method`` names -> quantizer alias.
METHODS = Registry("method")


def register(alias: str, *methods: str, replace: bool = False):
    """Class decorator: make a :class:`PO2Quantizer` subclass a quantizer of the
    package -- ``get(alias)``, Keras serialization (``save``/``load_model``),
    ``quantize_model(method=...)`` and ``keras-coherence quantize --method`` under
    ``alias`` and the short ``methods`` names. A name already taken raises ``ValueError``
    unless ``replace=True``."""

    def decorate(cls):
        if not (isinstance(cls, type) and issubclass(cls, PO2Quantizer)):
            raise TypeError(f"register decorates PO2Quantizer subclasses, not {cls!r}.")
        ALIASES.check(cls, alias, aliases=(cls.__name__,), replace=replace)
        METHODS.check(alias, alias, *methods, replace=replace)
        keras.utils.register_keras_serializable(package="keras_coherence")(cls)
        ALIASES.add(cls, alias, aliases=(cls.__name__,), replace=replace)
        METHODS.add(alias, alias, *methods, replace=replace)
        return cls

    return decorate


register("msqe_po2", "msqe")(MSQEPo2)  # the command line lists the methods in this order
register("msqe_po2_baseline", "msqe_baseline")(MSQEPo2Baseline)
register("learned_po2", "learned")(LearnedPo2)


def serialize(quantizer):
    """Keras config dict of a quantizer (``get``/``deserialize`` read it back)."""
    return keras.utils.serialize_keras_object(quantizer)


def deserialize(config, custom_objects=None):
    """A new quantizer from a ``serialize`` dict, a class name or an alias."""
    if isinstance(config, str):
        return get(config)
    return keras.utils.deserialize_keras_object(
        config, module_objects=ALIASES, custom_objects=custom_objects, printable_module_name="quantizer"
    )


def get(identifier):
    """Resolves a quantizer: None, an instance, an alias/class name, or a config dict.

    >>> type(get("learned_po2")).__name__, get(None)
    ('LearnedPo2', None)
    """
    if identifier is None or isinstance(identifier, PO2Quantizer):
        return identifier
    if isinstance(identifier, str):
        return ALIASES.lookup(identifier)()
    if isinstance(identifier, dict):
        return deserialize(identifier)
    raise ValueError(f"Could not interpret quantizer identifier: {identifier!r}")

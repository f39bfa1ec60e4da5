"""Activation ranges of a QAT model over the *global* batch under ``tf.distribute``.

tfmot's activation quantizers (``MovingAverageQuantizer``, and ``AllValuesQuantizer``
at a model's input) update their ``min``/``max`` variables from the batch they see. With
several replicas each sees its own share of the batch, and the variable ends up as the
mean of the replicas' updates: not the range one device would record on the same global
batch (the mean of the replicas' maxima is below the batch's maximum). The weights then
train against other fake-quantization ranges and drift away from one-device training.

:func:`install` wraps tfmot's two range ops (``tfmot_private.range_ops``: every quantizer
looks them up when it is called) so that, in training under more than one replica, the batch
minimum and maximum are first taken over all replicas (``all_gather``; ``ReduceOp`` has
no MIN/MAX), and tfmot's own op performs its update on those extremes; the inputs are then
fake-quantized with the updated range, as tfmot does. One replica, or inference: tfmot's
op unchanged. Installed when ``keras_coherence.quantization.qat`` is imported.
"""
from keras_coherence._internals import tfmot_private
from keras_coherence._keras import tf
from keras_coherence.coherence.step import in_replica_context


def _replicas():
    if not in_replica_context():
        return None
    ctx = tf.distribute.get_replica_context()
    return ctx if ctx.num_replicas_in_sync > 1 else None


def _global_extremes(ctx, inputs, per_channel):
    """``[2, ...]``: the minimum and maximum over every replica's batch (per channel:
    over all axes but the last, shaped so that tfmot's op reduces them the same way)."""
    axes = list(range(inputs.shape.rank - 1)) if per_channel else None
    lo = tf.reduce_min(ctx.all_gather(tf.reduce_min(inputs, axes)[None], axis=0), 0)
    hi = tf.reduce_max(ctx.all_gather(tf.reduce_max(inputs, axes)[None], axis=0), 0)
    extremes = tf.stack([lo, hi])
    if per_channel and inputs.shape.rank == 4:
        extremes = extremes[:, None, None, :]
    return tf.cast(extremes, inputs.dtype)


def _synced(op):
    def range_op(inputs, min_var, max_var, *args, **kwargs):
        ctx = _replicas()
        if ctx is None or not kwargs.get("is_training", True):
            return op(inputs, min_var, max_var, *args, **kwargs)
        per_channel = kwargs.get("per_channel", False)
        updated = op(_global_extremes(ctx, inputs, per_channel), min_var, max_var, *args, **kwargs)
        with tf.control_dependencies([updated]):
            lo, hi = tf.identity(min_var), tf.identity(max_var)
        return tfmot_private.fake_quant_with_min_max_vars(
            inputs, lo, hi, per_channel=per_channel, num_bits=kwargs.get("num_bits", 8),
            narrow_range=kwargs.get("narrow_range", False))

    range_op.tfmot_op = op
    return range_op


def install():
    """Wrap tfmot's ``MovingAvgQuantize`` and ``AllValuesQuantize`` (once)."""
    tfmot_private.set_range_ops(tfmot_private.RangeOps(
        *(op if hasattr(op, "tfmot_op") else _synced(op) for op in tfmot_private.range_ops())))

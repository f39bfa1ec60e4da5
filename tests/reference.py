"""Brute-force references for tests: one example at a time with tape.gradient."""
import numpy as np

from keras_coherence._keras import tf


def per_example_grads(model, loss_fn, x, y, sample_weight=None, training=False):
    """List over examples of {variable name: gradient} of sample_weight_i * loss_i."""
    out = []
    n = len(y)
    for i in range(n):
        xi = tf.nest.map_structure(lambda t: t[i:i + 1], x)
        with tf.GradientTape() as tape:
            loss = loss_fn(y[i:i + 1], model(xi, training=training))
            if sample_weight is not None:
                loss = loss * float(sample_weight[i])
        grads = tape.gradient(loss, model.trainable_variables)
        out.append([np.zeros(v.shape) if g is None else tf.convert_to_tensor(g).numpy().astype(np.float64)
                    for v, g in zip(model.trainable_variables, grads)])
    return out


def coherence_reference(model, loss_fn, x, y, sample_weight=None, layer_of=None):
    """(m_coherence, ||sum g||^2, sum ||g||^2, per-layer m_coherence) by brute force."""
    grads = per_example_grads(model, loss_fn, x, y, sample_weight)
    flat = np.stack([np.concatenate([g.ravel() for g in gs]) for gs in grads])
    s = flat.sum(0)
    total_s, total_q = float(s @ s), float((flat * flat).sum())
    per_layer = {}
    if layer_of is not None:
        groups = {}
        for idx, v in enumerate(model.trainable_variables):
            groups.setdefault(layer_of[id(v)], []).append(idx)
        for name, idxs in groups.items():
            g = np.stack([np.concatenate([gs[i].ravel() for i in idxs]) for gs in grads])
            sl = g.sum(0)
            per_layer[name] = float(sl @ sl) / float((g * g).sum())
    return total_s / total_q, total_s, total_q, per_layer


def layer_map(model, prefix=""):
    """id(variable) -> owning layer name, nested models as outer/inner."""
    from keras_coherence._keras import keras

    out = {}
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            out.update(layer_map(layer, prefix + layer.name + "/"))
        else:
            for v in layer.trainable_weights:
                out[id(v)] = prefix + layer.name
    return out


def tape_grads(fn, x, w, seed=1):
    """``(out, dL/dx, dL/dw, g)`` of ``out = fn(x, w)`` for ``L = sum(out * g)``, ``g`` a
    fixed standard-normal draw (numpy seed ``seed``) of ``out``'s shape."""
    x = tf.constant(x, tf.float32)
    w = tf.Variable(w, dtype=tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = fn(x, w)
        g = tf.constant(np.random.default_rng(seed).normal(size=out.shape), tf.float32)
        loss = tf.reduce_sum(out * g)
    dx, dw = tape.gradient(loss, [x, w])
    return out.numpy(), dx.numpy(), dw.numpy(), g.numpy()

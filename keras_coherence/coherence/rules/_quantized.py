"""Kernels read through larq quantizers: the value used in the forward pass and the
diagonal of its Jacobian (the straight-through-estimator multiplier)."""
from keras_coherence._keras import tf
from keras_coherence.coherence.registry import NotSupported

_ELEMENTWISE_NAMES = ("SteSign", "ApproxSign", "SwishSign", "SteHeaviside", "DoReFa", "MagnitudeAwareSign", "NoOp")


def check_quantizer(layer, attr: str) -> None:
    quantizer = getattr(layer, attr, None)
    if quantizer is None:
        return
    import larq as lq  # a quantizer is set: larq is loaded already

    if not isinstance(quantizer, tuple(getattr(lq.quantizers, name) for name in _ELEMENTWISE_NAMES)):
        raise NotSupported(
            f"{attr}={type(quantizer).__name__} is not a known element-wise quantizer"
        )


def read_kernel(layer, name: str = "kernel", quantizer_attr: str = "kernel_quantizer"):
    """Returns ``(w_used, ste)``: the kernel as the forward pass uses it, and the
    element-wise derivative d w_used / d latent (``None`` when it is 1)."""
    variable = getattr(layer, name)
    latent = tf.convert_to_tensor(getattr(variable, "latent_variable", variable))
    quantizer = getattr(layer, quantizer_attr, None)
    if quantizer is None:
        return latent, None
    with tf.GradientTape() as tape:
        tape.watch(latent)
        used = quantizer(latent)
    # Element-wise quantizers have a diagonal Jacobian, so d(sum used)/d latent is it.
    return used, tape.gradient(used, latent)


def quantize_input(layer, x):
    quantizer = getattr(layer, "input_quantizer", None)
    return x if quantizer is None else quantizer(x)

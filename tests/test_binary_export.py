"""Binary-network export: LCE inference files and the builtin-only on-device training model.

* LCE: binary ``QuantDense`` layers rewritten as 1×1 convolutions become
  ``LceBconv2d``; LCE's interpreter agrees with Keras (randomized BN statistics, so no
  exact sign ties).
* Training model (the low-memory MLP of ``keras_coherence.binary.models``, and the
  standard larq one): only builtin ops; in LiteRT the losses over the same batches
  follow Keras ``train_on_batch`` with Adam; weights round-trip through
  ``get_weights``/``set_weights``; weights trained in LiteRT go into a fresh Keras
  model and into an LCE model with the same outputs.
"""
import numpy as np
import pytest

import keras_coherence  # noqa: F401  (Keras 2 policy first)
from keras_coherence._keras import keras
from keras_coherence.binary import export_lce, export_training, models

STEPS, BATCH = 12, 16


def _task(n=STEPS * BATCH, dim=16, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0.0, 2.0, (classes, dim))
    y = rng.integers(0, classes, n).astype(np.int32)
    return (centers[y] + rng.normal(0.0, 1.0, (n, dim))).astype(np.float32), y


def _litert(flatbuffer):
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_content=bytes(flatbuffer))


# ------------------------------------------------------------------ LCE inference export
def _larq_mlp(seed=0):
    import larq as lq

    keras.utils.set_random_seed(seed)
    binary = dict(input_quantizer="ste_sign", kernel_quantizer="ste_sign", kernel_constraint="weight_clip",
                  use_bias=False)
    model = keras.Sequential([
        keras.Input((16,)),
        lq.layers.QuantDense(32, kernel_quantizer="ste_sign", use_bias=False, name="first"),
        keras.layers.BatchNormalization(name="bn0"),
        lq.layers.QuantDense(32, name="hidden", **binary),
        keras.layers.BatchNormalization(name="bn1"),
        lq.layers.QuantDense(4, name="head", **binary),
        keras.layers.BatchNormalization(name="bn2"),
    ])
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 2, c), rng.normal(0, 0.3, c), rng.normal(0, 2, c),
                               rng.uniform(0.5, 3, c)])
    return model


@pytest.fixture(scope="module")
def larq_mlp():
    return _larq_mlp()


def test_larq_inference_model_same_outputs(larq_mlp):
    x, _ = _task(64)
    conv = export_lce.larq_inference_model(larq_mlp)
    np.testing.assert_allclose(conv.predict(x, verbose=0), larq_mlp.predict(x, verbose=0), atol=1e-5)
    assert [type(layer).__name__ for layer in conv.layers].count("Sequential") == 3


def test_lce_matches_keras_and_is_smaller(larq_mlp):
    import larq_compute_engine as lce

    x, _ = _task(64)
    report = export_lce.compare(larq_mlp, x, repeats=3)
    assert "LceBconv2d" in report.lce_ops and "LceQuantize" in report.lce_ops
    # the first layer has a real input: a float FULLY_CONNECTED; the two binary ones are bconvs
    assert report.max_abs_diff < 1e-4 and report.argmax_agreement == 1.0
    assert report.lce_bytes < report.float_bytes
    # converted as it is, LCE keeps binary dense layers as float FULLY_CONNECTED
    plain = export_lce.tflite_ops(lce.convert_keras_model(larq_mlp))
    assert "LceBconv2d" not in plain and "FULLY_CONNECTED" in plain


def test_binary_dense_on_sequences_is_rejected():
    import larq as lq

    model = keras.Sequential([keras.Input((5, 8)), lq.layers.QuantDense(4, input_quantizer="ste_sign",
                                                                        kernel_quantizer="ste_sign")])
    with pytest.raises(ValueError, match=r"\[batch, features\]"):
        export_lce.larq_inference_model(model)


# ------------------------------------------------------------------ on-device training export
LR = 1e-2


def _bnn(method, seed=0, **kwargs):
    keras.utils.set_random_seed(seed)
    return models.mlp(input_shape=(16,), num_classes=4, hidden=(32, 32), method=method, **kwargs)


@pytest.fixture(scope="module", params=["low_memory", "standard"])
def exported(request):
    model = _bnn(request.param)
    initial = [w.copy() for w in model.get_weights()]
    module = export_training.TrainingModule(model, learning_rate=LR)
    return request.param, module, initial, export_training.to_training_tflite(module)


def test_training_model_is_builtin_only(exported):
    _, module, _, flatbuffer = exported
    ops = export_lce.tflite_ops(flatbuffer)
    assert export_lce.non_builtin_ops(flatbuffer) == []
    assert not [op for op in ops if op.startswith("Flex")]
    assert {"VAR_HANDLE", "READ_VARIABLE", "ASSIGN_VARIABLE"} <= set(ops)
    signatures = _litert(flatbuffer).get_signature_list()
    assert set(signatures) == {"train", "infer", "get_weights", "set_weights"}
    assert signatures["train"]["inputs"] == ["x", "y"] and signatures["train"]["outputs"] == ["loss"]
    assert sorted(signatures["get_weights"]["outputs"]) == sorted(module.state_names)


def _litert_follows_keras(reference, flatbuffer, x, y):
    """Trains ``reference`` (Keras ``train_on_batch``, Adam) and the file's ``train``
    signature on the same ``BATCH``-sized batches; asserts the losses agree and returns
    ``(interpreter, LiteRT losses)``."""
    reference.compile(keras.optimizers.Adam(LR), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    keras_losses = [float(reference.train_on_batch(x[i:i + BATCH], y[i:i + BATCH]))
                    for i in range(0, len(x), BATCH)]
    interp = _litert(flatbuffer)
    train = interp.get_signature_runner("train")
    lite_losses = [float(train(x=x[i:i + BATCH], y=y[i:i + BATCH])["loss"]) for i in range(0, len(x), BATCH)]
    np.testing.assert_allclose(lite_losses, keras_losses, rtol=1e-3, atol=1e-4)
    return interp, lite_losses


def test_litert_losses_follow_keras(exported):
    method, _, initial, flatbuffer = exported
    x, y = _task()
    reference = _bnn(method, seed=1)
    reference.set_weights(initial)
    interp, lite_losses = _litert_follows_keras(reference, flatbuffer, x, y)
    assert np.mean(lite_losses[-4:]) < np.mean(lite_losses[:4])
    lite_weights = interp.get_signature_runner("get_weights")()
    for name, var in export_training.keras_state(reference).items():
        np.testing.assert_allclose(lite_weights[name], var.numpy(), atol=1e-3, err_msg=name)
    logits = interp.get_signature_runner("infer")(x=x[:40])["logits"]
    np.testing.assert_allclose(logits, reference.predict(x[:40], verbose=0), atol=1e-3)


def test_weights_round_trip(exported):
    _, module, _, flatbuffer = exported
    interp = _litert(flatbuffer)
    rng = np.random.default_rng(3)
    state = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in module.weights().items()}
    interp.get_signature_runner("set_weights")(**state)
    back = interp.get_signature_runner("get_weights")()
    assert set(back) == set(state)
    for name in state:
        np.testing.assert_array_equal(back[name], state[name])


def test_device_weights_into_keras_and_lce(exported):
    method, _, initial, flatbuffer = exported
    x, y = _task()
    interp = _litert(flatbuffer)
    train = interp.get_signature_runner("train")
    for _ in range(2):
        for i in range(0, len(x), BATCH):
            train(x=x[i:i + BATCH], y=y[i:i + BATCH])
    trained = interp.get_signature_runner("get_weights")()
    device_logits = interp.get_signature_runner("infer")(x=x)["logits"]

    fresh = export_training.set_keras_weights(_bnn(method, seed=2), trained)
    keras_logits = fresh.predict(x, verbose=0)
    np.testing.assert_allclose(keras_logits, device_logits, atol=1e-3)

    lce_model = export_lce.to_lce(fresh)
    assert "LceBconv2d" in export_lce.tflite_ops(lce_model)
    lce_logits = export_lce.lce_predict(lce_model, x)
    np.testing.assert_allclose(lce_logits, keras_logits, atol=1e-3)
    assert np.mean(lce_logits.argmax(-1) == y) > 0.6


def test_set_keras_weights_names_what_is_missing(exported):
    _, _, _, _ = exported
    with pytest.raises(ValueError, match="no values for"):
        export_training.set_keras_weights(_bnn("low_memory"), {})


def test_conv_backward_needs_a_fixed_batch():
    """Binary dense layers written as 1x1 BinaryConv2D: their filter gradient is a conv2d
    over the batch axis, which lowers to CONV_2D only with a fixed batch size."""
    model = _bnn("low_memory", dense_as_conv=True)
    with pytest.raises(ValueError, match=r"\['Conv2D'\].*fixed batch size"):
        export_training.to_training_tflite(export_training.TrainingModule(model, learning_rate=LR))
    module = export_training.TrainingModule(model, learning_rate=LR, batch_size=BATCH)
    initial = module.weights()
    flatbuffer = export_training.to_training_tflite(module)
    assert "CONV_2D" in export_lce.tflite_ops(flatbuffer) and export_lce.non_builtin_ops(flatbuffer) == []
    x, y = _task(3 * BATCH)
    tf_losses = [float(module.train(x[i:i + BATCH], y[i:i + BATCH])["loss"]) for i in range(0, len(x), BATCH)]
    module.assign(initial)
    train = _litert(flatbuffer).get_signature_runner("train")
    lite_losses = [float(train(x=x[i:i + BATCH], y=y[i:i + BATCH])["loss"]) for i in range(0, len(x), BATCH)]
    np.testing.assert_allclose(lite_losses, tf_losses, rtol=1e-4, atol=1e-5)


def _tiny_cnv(seed=0):
    """CNV-like and small (the full builder's 16 layers take 15 s to convert): a valid
    conv, l1 BN, then a 2x2 pool (CNV's order); a same conv, a 'same' pool on its 5x5
    output, then l1 BN (BinaryNet's order); binary dense logits."""
    from keras_coherence.binary import layers as bl

    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((12, 12, 1)),
        bl.BinaryConv2D(4, 3, first_layer=True, name="conv_1"), bl.L1BatchNormalization(name="bn_1"),
        bl.LowMemoryMaxPooling2D(2, name="pool_1"),
        bl.BinaryConv2D(4, 3, padding="same", name="conv_2"),
        bl.LowMemoryMaxPooling2D(2, padding="same", name="pool_2"), bl.L1BatchNormalization(name="bn_2"),
        keras.layers.Flatten(name="flatten"), bl.BinaryDense(4, name="logits"),
        bl.L1BatchNormalization(name="logits_bn")])


def test_low_memory_cnv_with_max_pool_trains_in_litert():
    """The hand-written max-pool backward replaces MaxPoolGrad: builtin ops only, and
    LiteRT follows Keras over a few fixed-size batches."""
    model = _tiny_cnv()
    initial = [w.copy() for w in model.get_weights()]
    flatbuffer = export_training.to_training_tflite(
        export_training.TrainingModule(model, learning_rate=LR, batch_size=BATCH))
    ops = set(export_lce.tflite_ops(flatbuffer))
    assert export_lce.non_builtin_ops(flatbuffer) == []
    assert {"MAX_POOL_2D", "SPACE_TO_DEPTH", "DEPTH_TO_SPACE"} <= ops
    features = int(np.prod(model.input_shape[1:]))
    x, y = _task(4 * BATCH, dim=features)
    reference = _tiny_cnv(seed=1)
    reference.set_weights(initial)
    _, lite_losses = _litert_follows_keras(reference, flatbuffer, x.reshape((-1,) + model.input_shape[1:]), y)
    assert np.all(np.isfinite(lite_losses))


def test_documented_commands_end_to_end(tmp_path, capsys):
    """edge-export -> (edge runner) train -> edge-lce -> edge-keras-train, on 300 embedded-MNIST images."""
    import json

    from edge import runner
    from keras_coherence import cli

    common = ["--model", "mlp", "--method", "low_memory", "--hidden", "16"]
    cli.main(["edge-export", *common, "--max-examples", "300", "--out", str(tmp_path)])
    exported = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert exported["bytes"] > 0 and exported["train_examples"] == 300
    summary = runner.train(str(tmp_path / "train.tflite"), str(tmp_path / "train.npz"), epochs=1, batch_size=50,
                           checkpoint_dir=str(tmp_path / "ckpt"), progress=False)
    assert summary["steps"] >= 1
    cli.main(["edge-lce", *common, "--weights", str(tmp_path / "ckpt" / "epoch_0001.npz"),
              "--data", str(tmp_path / "test.npz"), "--out", str(tmp_path), "--parity-examples", "20"])
    lce = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert lce["lce_accuracy"] == lce["keras_accuracy"] and lce["argmax_agreement"] == 1.0
    assert "LceBconv2d" in lce["lce_ops"] and (tmp_path / "model_lce.tflite").exists()
    cli.main(["edge-keras-train", *common, "--data", str(tmp_path / "train.npz"), "--batch-size", "50"])
    keras_run = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert keras_run["steps"] == summary["steps"] and keras_run["peak_rss_mib"] >= keras_run["setup_peak_rss_mib"]


def test_clip_binary_kernels_keeps_latent_weights_in_range():
    model = _bnn("low_memory")
    module = export_training.TrainingModule(model, learning_rate=0.5, clip_binary_kernels=True)
    x, y = _task(2 * BATCH)
    for i in range(0, len(x), BATCH):
        module.train(x[i:i + BATCH], y[i:i + BATCH])
    kernels = [v.numpy() for v in model.trainable_variables if getattr(v, "precision", None) == 1]
    assert kernels and all(np.abs(k).max() <= 1.0 for k in kernels)
    assert any(np.abs(k).max() == 1.0 for k in kernels)  # lr 0.5 pushes some to the bound


# ------------------------------------------------------------------ unsupported layers, dilation
def _lambda_model():
    inp = keras.Input((8,))
    h = keras.layers.Lambda(lambda t: t * 2.0, name="doubler")(inp)
    return keras.Model(inp, keras.layers.Dense(3, name="head")(h), name="with_lambda")


def _flat(*layers, shape=(8,), name="net"):
    inp = keras.Input(shape)
    h = inp
    for layer in layers:
        h = layer(h)
    return keras.Model(inp, h, name=name)


@pytest.mark.parametrize("build,fragments", [
    (lambda: models.cnv(method="standard"),
     ["'conv_1' (QuantConv2D: autodiff's kernel gradient is Conv2DBackpropFilter",
      "'bn_conv_1' (BatchNormalization: on images it is a fused batch norm",
      "'pool_2' (MaxPooling2D: autodiff's MaxPoolGrad", "method='low_memory'"]),
    (lambda: _flat(keras.layers.Dense(6, activation="relu", name="hidden"), keras.layers.Dense(3)),
     ["'hidden' (Dense: activation 'relu'"]),
    (lambda: _flat(keras.layers.AveragePooling2D(2, name="avg"), keras.layers.Flatten(),
                   keras.layers.Dense(3), shape=(4, 4, 2)),
     ["'avg' (AveragePooling2D: autodiff's AvgPoolGrad"]),
    (_lambda_model, ["'doubler' (Lambda: no rule"]),
])
def test_training_module_names_unsupported_layers(build, fragments):
    model = build()
    with pytest.raises(ValueError) as err:
        export_training.TrainingModule(model, batch_size=4)
    message = str(err.value)
    for fragment in fragments:
        assert fragment in message, message
    assert "Supported: BinaryDense, BinaryConv2D" in message


def test_lce_export_names_unsupported_layers():
    with pytest.raises(ValueError, match=r"unsupported layer\(s\) 'doubler' \(Lambda\). Supported: "
                                         r"BinaryDense"):
        export_lce.to_lce(_lambda_model())
    inner = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)], name="inner")
    with pytest.raises(ValueError, match=r"'inner' \((Sequential|Functional)\)"):
        export_lce.larq_inference_model(_flat(inner, keras.layers.Dense(3)))


def _dilated_net(seed=0, dropout=False):
    """A dilated binary conv, a dilated same-padded one added to it (Add), global average
    pool, a real Dense + batch norm on [batch, features], binary dense logits."""
    from keras_coherence.binary import layers as bl

    keras.utils.set_random_seed(seed)
    inp = keras.Input((9, 9, 2))
    a = bl.BinaryConv2D(4, 3, dilation_rate=2, padding="same", first_layer=True, name="conv_a")(inp)
    a = bl.L1BatchNormalization(name="bn_a")(a)
    b = bl.BinaryConv2D(4, 3, dilation_rate=2, padding="same", name="conv_b")(a)
    b = bl.L1BatchNormalization(name="bn_b")(b)
    h = keras.layers.Add(name="add")([a, b])
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    if dropout:
        h = keras.layers.Dropout(0.5, name="drop")(h)
    h = keras.layers.Dense(6, name="dense")(h)
    h = keras.layers.BatchNormalization(name="bn_dense")(h)
    h = bl.BinaryDense(4, name="logits")(h)
    return keras.Model(inp, bl.L1BatchNormalization(name="logits_bn")(h), name="dilated")


def test_dilated_add_gap_net_trains_in_litert_like_keras():
    model = _dilated_net()
    initial = [w.copy() for w in model.get_weights()]
    flatbuffer = export_training.to_training_tflite(
        export_training.TrainingModule(model, learning_rate=LR, batch_size=BATCH))
    assert export_lce.non_builtin_ops(flatbuffer) == []
    x, y = _task(4 * BATCH, dim=9 * 9 * 2)
    reference = _dilated_net(seed=1)
    reference.set_weights(initial)
    _litert_follows_keras(reference, flatbuffer, x.reshape(-1, 9, 9, 2), y)


def test_dilated_net_lce_matches_keras():
    model = _dilated_net(dropout=True)
    rng = np.random.default_rng(4)
    for layer in model.layers:  # moving statistics away from their init: no sign ties at 0
        if hasattr(layer, "moving_sigma"):
            c = layer.beta.shape[0]
            layer.set_weights([rng.normal(0, 0.3, c), rng.normal(0, 0.5, c), rng.uniform(0.5, 2, c)])
    x, _ = _task(32, dim=9 * 9 * 2)
    x = x.reshape(-1, 9, 9, 2)
    lce_model = export_lce.to_lce(model)
    assert "LceBconv2d" in export_lce.tflite_ops(lce_model)
    np.testing.assert_allclose(export_lce.lce_predict(lce_model, x), model.predict(x, verbose=0),
                               atol=1e-4)

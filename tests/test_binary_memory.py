"""memory_profile against hand-computed bits: the paper's MLP, CNV and BinaryNet layer by
layer, ResNetE-18's Add and pooling rows; methods that contradict a model's layers. The
device layout against hand-computed rows and against real exported training graphs: the
tensors alive across the turn from the forward to the backward pass (read from the
flatbuffer's op order) and the ``get_weights`` state."""
import collections
import os
import sys
import tempfile

import numpy as np
import pytest

import keras_coherence  # noqa: F401  (Keras 2 policy first)
from keras_coherence._keras import keras
from keras_coherence.binary import config as C
from keras_coherence.binary import models as bm
from keras_coherence.binary.memory import COLUMNS, MemoryRow, memory_profile, memory_ratio

B = 7
SIZES = [(784, 256), (256, 256), (256, 256), (256, 256), (256, 10)]


def _rows(profile):
    return {r.layer: r for r in profile.rows}


def _names(i):
    last = i == len(SIZES) - 1
    return ("logits", "logits_bn") if last else (f"fc_{i + 1}", f"bn_fc_{i + 1}")


def test_mlp_standard_adam_hand_computed():
    rows = _rows(memory_profile("mlp", B, "standard", "adam"))
    for i, (n_in, n_out) in enumerate(SIZES):
        dense, bn = _names(i)
        w = n_in * n_out
        assert rows[dense] == MemoryRow(
            dense, "binary", weights=w, latent_weights=32 * w, weight_gradients=32 * w,
            optimizer_slots=2 * 32 * w, statistics=0, saved_activations=B * n_in * 32,
            gradient_buffers=B * (n_in + n_out) * 32)
        c = n_out
        assert rows[bn] == MemoryRow(
            bn, "batch_norm", weights=2 * c, latent_weights=2 * c * 32,
            weight_gradients=2 * c * 32, optimizer_slots=2 * 2 * c * 32,
            statistics=2 * c * 32, saved_activations=B * c * 32 + 2 * c * 32,
            gradient_buffers=B * 2 * c * 32)
    assert rows["input"].persistent == rows["flatten"].gradient_buffers == 0


@pytest.mark.parametrize("method,grad_bits", [("low_memory", 16), ("low_memory_po2", 5)])
def test_mlp_low_memory_adam_hand_computed(method, grad_bits):
    profile = memory_profile("mlp", B, method, "adam")
    rows = _rows(profile)
    for i, (n_in, n_out) in enumerate(SIZES):
        dense, bn = _names(i)
        w = n_in * n_out
        saved = B * n_in * (32 if i == 0 else 2)   # real first input; sign + mask bits
        assert rows[dense] == MemoryRow(
            dense, "binary", weights=w, latent_weights=16 * w, weight_gradients=1 * w,
            optimizer_slots=2 * 32 * w, saved_activations=saved,
            gradient_buffers=B * (n_in + n_out) * grad_bits)
        c = n_out
        assert rows[bn] == MemoryRow(
            bn, "l1_batch_norm", weights=c, latent_weights=16 * c, weight_gradients=16 * c,
            optimizer_slots=2 * 32 * c, statistics=2 * c * 16,
            saved_activations=B * c * 1 + 2 * c * 16, gradient_buffers=B * 2 * c * grad_bits)
    totals = profile.totals()
    assert totals["gradient_buffers"] == B * (784 + 256) * grad_bits
    assert totals["peak"] == sum(r.persistent for r in profile.rows) + B * 1040 * grad_bits


def test_bop_has_one_slot_on_binary_kernels_and_optimizer_bits():
    rows = _rows(memory_profile("mlp", B, "low_memory", "bop", optimizer_bits=16))
    assert rows["fc_2"].optimizer_slots == 65536 * 16
    assert rows["bn_fc_2"].optimizer_slots == 2 * 256 * 16
    assert _rows(memory_profile("mlp", B, "standard", "sgd"))["fc_2"].optimizer_slots == 0


def test_ablation_switches_change_the_right_columns():
    no_retention = C.LowMemoryConfig(binary_activation_retention=False)
    rows = _rows(memory_profile("mlp", B, no_retention))
    assert rows["fc_2"].saved_activations == B * 256 * 32
    rows = _rows(memory_profile("mlp", B, C.LowMemoryConfig(binarize_weight_grads=False,
                                                             latent_weights="float32")))
    assert rows["fc_2"].weight_gradients == rows["fc_2"].latent_weights == 65536 * 32
    rows = _rows(memory_profile("mlp", B, C.LowMemoryConfig(l1_batchnorm=False)))
    assert rows["bn_fc_2"].kind == "batch_norm"


def test_profile_of_a_built_model_reads_its_method_and_formats():
    model = bm.mlp((4, 4, 1), 3, method="low_memory_po2", hidden=(8,), dense_as_conv=True)
    profile = memory_profile(model, 5)
    assert profile.method == "low_memory_po2"
    assert _rows(profile)["fc_1"].weights == 16 * 8
    text = str(profile)
    assert "fc_1" in text and "peak:" in text
    assert profile.as_dict()["totals"]["peak"] == profile.peak_bits


def test_mlp_ratio_equals_the_hand_computed_peaks_and_errors():
    b = 100
    std = sum(128 * i * o + b * i * 32 + 384 * o + b * o * 32 for i, o in SIZES)
    low = sum(81 * i * o + b * i * (32 if k == 0 else 2) + 160 * o + b * o
              for k, (i, o) in enumerate(SIZES))
    std += b * (784 + 256) * 32                      # largest gradient buffer: fc_1
    low += b * (784 + 256) * 16
    assert memory_ratio("mlp", b) == std / low
    assert round(std / low, 2) == 1.73               # the figure docs/binary.md quotes
    with pytest.raises(ValueError, match="batch_size"):
        memory_profile("mlp", 0)
    with pytest.raises(ValueError, match="Unknown optimizer"):
        memory_profile("mlp", 10, optimizer="rmsprop")
    with pytest.raises(ValueError, match="Unknown training method"):
        memory_profile("mlp", 10, method="tiny")


# ------------------------------------------------------------------ CNV and BinaryNet
# An independent reference written from the formulas of docs/binary.md ("Memory model"):
# the layer list and every shape are derived here by hand from the architectures (3x3
# convs, 2x2 pools), not read from the Keras models.


def _conv_out(size, padding):
    return size - 2 if padding == "valid" else size


def _vgg_spec(filters, fc, padding, pool_before_bn, size=32, channels=3, classes=10):
    """``[(layer, kind, n_in, n_out, extra)]`` of CNV / BinaryNet, in Keras layer order;
    ``extra``: kernel elements (binary), channels (batch norm) or pool area (pool)."""
    spec = [("input", "shape", 0, 0, None)]
    c_in = channels
    for i, f in enumerate(filters, start=1):
        out = _conv_out(size, padding)
        spec.append((f"conv_{i}", "binary", size * size * c_in, out * out * f, 9 * c_in * f))
        size, c_in = out, f
        pooled = i % 2 == 0 and (pool_before_bn or i < 6)
        if pooled and pool_before_bn:
            spec.append((f"pool_{i}", "max_pool", size * size * f, (size // 2) ** 2 * f, 4))
            size //= 2
        spec.append((f"bn_conv_{i}", "bn", size * size * f, size * size * f, f))
        if pooled and not pool_before_bn:
            spec.append((f"pool_{i}", "max_pool", size * size * f, (size // 2) ** 2 * f, 4))
            size //= 2
    width = size * size * c_in
    spec.append(("flatten", "shape", width, width, None))
    for i, units in enumerate(tuple(fc) + (classes,), start=7):
        name, bn = (f"fc_{i}", f"bn_fc_{i}") if i < 7 + len(fc) else ("logits", "logits_bn")
        spec.append((name, "binary", width, units, width * units))
        spec.append((bn, "bn", units, units, units))
        width = units
    return spec


CNV_SPEC = _vgg_spec((64, 64, 128, 128, 256, 256), (512, 512), "valid", pool_before_bn=False)
BINARYNET_SPEC = _vgg_spec((128, 128, 256, 256, 512, 512), (1024, 1024), "same",
                           pool_before_bn=True)


def _expected_row(name, kind, n_in, n_out, extra, low, b):
    """A MemoryRow from the documented per-layer formulas (Adam: 2 slots of 32 bits)."""
    grad_x = 16 if low else 32
    if kind == "shape":
        return MemoryRow(name, "shape")
    if kind == "binary":
        w = extra
        first = name == "conv_1"
        return MemoryRow(name, "binary", weights=w, latent_weights=(16 if low else 32) * w,
                         weight_gradients=(1 if low else 32) * w, optimizer_slots=2 * 32 * w,
                         saved_activations=b * n_in * (32 if first or not low else 2),
                         gradient_buffers=b * (n_in + n_out) * grad_x)
    if kind == "bn":
        c = extra
        if low:   # l1 batch norm: beta only; 1 sign bit per element + sigma, s per channel
            return MemoryRow(name, "l1_batch_norm", weights=c, latent_weights=16 * c,
                             weight_gradients=16 * c, optimizer_slots=2 * 32 * c,
                             statistics=2 * 16 * c, saved_activations=b * n_in + 2 * 16 * c,
                             gradient_buffers=b * 2 * n_in * 16)
        return MemoryRow(name, "batch_norm", weights=2 * c, latent_weights=32 * 2 * c,
                         weight_gradients=32 * 2 * c, optimizer_slots=2 * 32 * 2 * c,
                         statistics=2 * 32 * c, saved_activations=b * n_in * 32 + 2 * 32 * c,
                         gradient_buffers=b * 2 * n_in * 32)
    assert kind == "max_pool"
    # low-memory: ceil(log2(4)) = 2 index bits per output; standard: the float32 input
    saved = b * n_out * 2 if low else b * n_in * 32
    return MemoryRow(name, "max_pool", saved_activations=saved,
                     gradient_buffers=b * (n_in + n_out) * grad_x)


@pytest.mark.parametrize("name,spec", [("cnv", CNV_SPEC), ("binarynet", BINARYNET_SPEC)])
@pytest.mark.parametrize("method", ["standard", "low_memory"])
def test_conv_models_hand_computed_layer_by_layer(name, spec, method):
    profile = memory_profile(name, B, method, "adam")
    low = method == "low_memory"
    expected = [_expected_row(*entry, low=low, b=B) for entry in spec]
    assert [r.layer for r in profile.rows] == [r.layer for r in expected]
    for got, want in zip(profile.rows, expected):
        assert got == want, got.layer
    persistent = sum(sum(getattr(r, c) for c in COLUMNS[:-1]) for r in expected)
    largest = max(r.gradient_buffers for r in expected)
    assert profile.totals()["gradient_buffers"] == largest
    assert profile.peak_bits == persistent + largest


def test_conv_model_parameter_counts_match_the_spec():
    # the spec's kernel/channel counts are the builders' parameters (BN: 4 per channel)
    for name, spec, per_bn in (("cnv", CNV_SPEC, 4), ("binarynet", BINARYNET_SPEC, 4)):
        expected = sum(e for _, k, _, _, e in spec if k == "binary") + \
            sum(per_bn * e for _, k, _, _, e in spec if k == "bn")
        assert bm.build_binary_model(name, "standard").count_params() == expected


# ------------------------------------------------------------------ ResNetE-18: Add, pools


def test_resnet_add_and_pool_rows_count_what_they_need():
    """32x32x3, width 4: stem 16x16x4 -> stem pool 8x8x4; stages 8x8x4, 4x4x8, 2x2x16,
    1x1x32."""
    for method, grad_x in (("standard", 32), ("low_memory", 16)):
        rows = _rows(memory_profile("resnet_e18", B, method, "adam", input_shape=(32, 32, 3),
                                    num_classes=10, width=4))
        # Keras's overlapping 3x3/2 stem pool: autodiff's MaxPoolGrad keeps its float input
        assert rows["stem_pool"] == MemoryRow(
            "stem_pool", "max_pool", saved_activations=B * 16 * 16 * 4 * 32,
            gradient_buffers=B * (16 * 16 * 4 + 8 * 8 * 4) * grad_x)
        # constant derivatives: nothing saved, but an input and an output gradient
        assert rows["stage1_block1_conv1_add"] == MemoryRow(
            "stage1_block1_conv1_add", "add", gradient_buffers=B * (256 + 256) * grad_x)
        assert rows["stage2_block1_conv1_sc_pool"] == MemoryRow(
            "stage2_block1_conv1_sc_pool", "avg_pool",
            gradient_buffers=B * (8 * 8 * 4 + 4 * 4 * 4) * grad_x)
        assert rows["head_pool"] == MemoryRow("head_pool", "avg_pool",
                                              gradient_buffers=B * (32 + 32) * grad_x)
        assert rows["head_relu"] == MemoryRow("head_relu", "activation",
                                              saved_activations=B * 32 * 32,
                                              gradient_buffers=B * 64 * grad_x)
        # the real shortcut conv: float32 in both methods
        w = 4 * 8
        assert rows["stage2_block1_conv1_sc_conv"] == MemoryRow(
            "stage2_block1_conv1_sc_conv", "real", weights=w, latent_weights=32 * w,
            weight_gradients=32 * w, optimizer_slots=64 * w, saved_activations=B * 64 * 32,
            gradient_buffers=B * (64 + 128) * grad_x)


# ------------------------------------------------------------------ contradicting methods


def test_method_contradicting_the_layers_is_refused_both_ways():
    standard = bm.mlp((4, 4, 1), 3, method="standard", hidden=(8,))
    low = bm.mlp((4, 4, 1), 3, method="low_memory", hidden=(8,))
    with pytest.raises(ValueError, match=r"method='low_memory'\) contradicts .*standard.*QuantDense"):
        memory_profile(standard, 5, method="low_memory")
    with pytest.raises(ValueError, match=r"method='standard'\) contradicts .*low_memory.*BinaryDense"):
        memory_profile(low, 5, method="standard")
    with pytest.raises(ValueError, match=r"method='low_memory_po2'\) contradicts"):
        memory_profile(low, 5, method="low_memory_po2")
    # the method the layers use, given or read, is accepted and the same table
    assert memory_profile(low, 5, method="low_memory").rows == memory_profile(low, 5).rows
    assert memory_profile(standard, 5, method="standard").method == "standard"
    assert memory_profile(standard, 5).method == "standard"


def test_models_mixing_methods_are_refused():
    import larq as lq

    from keras_coherence.binary import layers as bl

    inp = keras.Input((6,))
    h = lq.layers.QuantDense(4, input_quantizer="ste_sign", kernel_quantizer="ste_sign",
                             use_bias=False, name="larq_fc")(inp)
    h = bl.BinaryDense(3, name="ours_fc")(h)
    with pytest.raises(ValueError, match="mixes standard binary layers.*'larq_fc'.*'ours_fc'"):
        memory_profile(keras.Model(inp, h), 5)
    inp = keras.Input((6,))
    h = bl.BinaryDense(4, method="low_memory", name="a")(inp)
    h = bl.BinaryDense(3, method="low_memory_po2", name="b")(h)
    with pytest.raises(ValueError, match="several methods"):
        memory_profile(keras.Model(inp, h), 5)
# ------------------------------------------------------------------ device layout


def test_device_layout_mlp_rows_hand_computed():
    """Low-memory MLP, batch 7: float32 state and Adam, per-example packed words (the
    first layer computes no input gradient: no kernel sign words, its float input)."""
    b, words = B, lambda n: -(-n // 32)
    profile = memory_profile("mlp", b, "low_memory", layout="device")
    rows = _rows(profile)
    assert profile.layout == "device" and "working_set" in str(profile)
    fc1, fc2, bn1 = rows["fc_1"], rows["fc_2"], rows["bn_fc_1"]
    w1 = 784 * 256
    assert fc1.latent_weights == 32 * w1 and fc1.optimizer_slots == 64 * w1
    assert fc1.weight_gradients == fc1.gradient_buffers == fc1.statistics == 0
    assert fc1.saved_activations == 32 * (words(w1) + b * 784)
    assert fc1.file_constants == 32 * w1
    # Adam's five kernel-sized buffers beat 3 activation buffers + a kernel-sized matmul buffer
    assert fc1.working_set == max(3 * b * 784 * 32 + 32 * w1, 5 * 32 * w1) == 5 * 32 * w1
    assert fc2.saved_activations == 32 * (2 * words(65536) + 2 * b * words(256))
    assert bn1.latent_weights == 32 * 256 and bn1.statistics == 2 * 32 * 256
    assert bn1.saved_activations == 32 * (b * words(256) + 2 * 256)
    assert rows["loss"].saved_activations == 32 * (2 * b * 10 + 1)
    shapes = [(784, 256), (256,), (256, 256), (256, 10), (10,)]
    sizes = [784 * 256, 256, 65536, 2560, 10]
    assert len(shapes) == len(sizes)
    assert rows["optimizer"].file_constants == 32 * (1 + sum(sizes))
    assert rows["optimizer"].optimizer_slots == 32
    assert rows["runtime"].runtime == 8 * 2 ** 19
    trainable = sum(i * o for i, o in SIZES) + sum(o for _, o in SIZES)   # kernels, betas
    assert profile.state_bits() == 32 * (3 * trainable + 1 + 2 * sum(o for _, o in SIZES))
    totals = profile.totals()
    assert totals["working_set"] == 5 * 32 * w1
    assert totals["peak"] == sum(r.persistent for r in profile.rows) + 5 * 32 * w1


def test_device_layout_conv_scratch_follows_the_batch_split():
    """CNV conv_2 (30x30x64 -> 28x28x64, 3x3): im2col bytes per example
    max(28*28*9*64, 30*30*9*64) * 4 = 2,073,600; a 16 MiB budget fits 8 examples."""
    per_example = 30 * 30 * 9 * 64 * 4
    act = 3 * 30 * 30 * 64 * 32   # three float32 buffers of the larger side, per example
    for batch, chunk in ((8, 8), (100, 8), (3, 3)):
        rows = _rows(memory_profile("cnv", batch, "low_memory", layout="device"))
        # 100 examples: 13 chunks of ceil(100 / 13) = 8
        assert rows["conv_2"].working_set == batch * act + 8 * chunk * per_example
    rows = _rows(memory_profile("cnv", 100, "low_memory", layout="device", scratch_bytes=None))
    assert rows["conv_2"].working_set == 100 * act + 8 * 100 * per_example


def test_device_layout_errors_and_paper_default():
    with pytest.raises(ValueError, match="standard_device"):
        memory_profile("mlp", 10, "standard", layout="device")
    with pytest.raises(ValueError, match="Adam"):
        memory_profile("mlp", 10, "low_memory", optimizer="bop", layout="device")
    with pytest.raises(ValueError, match="layout="):
        memory_profile("mlp", 10, layout="edge")
    with pytest.raises(ValueError, match="scratch_bytes"):
        memory_profile("mlp", 10, "low_memory", layout="device", scratch_bytes=0)
    assert memory_profile("mlp", 10).layout == "paper"
    device = memory_ratio("mlp", 1000, layout="device")
    assert device == (memory_profile("mlp", 1000, "standard_device", layout="device").peak_bits
                      / memory_profile("mlp", 1000, "low_memory", layout="device").peak_bits)
    from keras_coherence.binary import export_training
    from keras_coherence.binary.memory import DEFAULT_SCRATCH_BYTES
    assert DEFAULT_SCRATCH_BYTES == export_training.DEFAULT_SCRATCH_BYTES


# ------------------------------------------------------------------ device layout vs an export
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE_BATCH = 6


def _small_device_model(method):
    """Every row kind of the binary models: a first and a later binary conv, a pool, both
    batch norms, a real 1x1 conv and ReLU, binary dense layers (8x8x2 inputs, 5 classes)."""
    b = bm._Blocks(method)
    inp = keras.Input((8, 8, 2), name="input")
    h = b.conv(inp, 4, 3, "conv_1", first_layer=True)
    h = b.batch_norm(h, "bn_conv_1")
    h = b.conv(h, 6, 3, "conv_2")
    h = b.max_pool(h, "pool_2")
    h = b.batch_norm(h, "bn_conv_2")
    h = b.real_conv(h, 5, 1, "real_conv")
    h = b.relu(h, "relu")
    h = keras.layers.Flatten(name="flatten")(h)
    h = b.dense(h, 40, "fc_3")
    h = b.batch_norm(h, "bn_fc_3")
    h = b.dense(h, 5, "logits")
    h = b.batch_norm(h, "logits_bn")
    return keras.Model(inp, h, name="small")


def _boundary_tensors(flatbuffer):
    """The train signature's tensors alive across the turn to the backward pass: written
    at or before the op that writes the loss, read after it (constants, resource handles
    and variable reads excluded), from the flatbuffer's op order."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import bnn_device_memory as bdm
    from ai_edge_litert import schema_py_generated as schema

    tensors, _ = bdm.tensor_breakdown(flatbuffer)
    model = schema.Model.GetRootAsModel(flatbuffer, 0)
    sig = next(model.SignatureDefs(i) for i in range(model.SignatureDefsLength())
               if model.SignatureDefs(i).SignatureKey().decode() == "train")
    graph = model.Subgraphs(sig.SubgraphIndex())
    loss = next(sig.Outputs(i).TensorIndex() for i in range(sig.OutputsLength())
                if sig.Outputs(i).Name().decode() == "loss")
    written, last_read = {}, {}
    for j in range(graph.OperatorsLength()):
        op = graph.Operators(j)
        for k in (op.InputsAsNumpy() if op.InputsLength() else []):
            last_read[int(k)] = j
        for k in (op.OutputsAsNumpy() if op.OutputsLength() else []):
            written[int(k)] = j
    turn = written[loss]
    return [t for t in tensors
            if t["kind"] not in ("constant", "resource_handle", "variable_read")
            and t["index"] != loss
            and written.get(t["index"], -1) <= turn < last_read.get(t["index"], -1)]


@pytest.fixture(scope="module", params=["low_memory", "standard_device"])
def exported(request):
    from keras_coherence.binary import export_training

    keras.utils.set_random_seed(0)
    model = _small_device_model(request.param)
    flatbuffer = export_training.to_training_tflite(
        export_training.TrainingModule(model, batch_size=DEVICE_BATCH))
    return model, flatbuffer


_BYTES = {"float32": 4, "int32": 4, "uint8": 1, "bool": 1}


def _kept_bytes(kept):
    return collections.Counter((dtype, int(np.prod(shape, dtype=np.int64)) * _BYTES[dtype])
                               for _, dtype, shape in kept)


@pytest.mark.device_export
def test_device_layout_saved_tensors_are_the_exported_graphs(exported):
    model, flatbuffer = exported
    profile = memory_profile(model, DEVICE_BATCH, layout="device")
    boundary = _boundary_tensors(flatbuffer)
    found = collections.Counter((t["dtype"], t["bytes"]) for t in boundary)
    rows = {r.layer: r for r in profile.rows}
    predicted = sum((_kept_bytes(r.kept) for r in profile.rows), collections.Counter())
    assert found == predicted
    assert profile.totals()["saved_activations"] == 8 * sum(t["bytes"] for t in boundary)
    # tensors named after a layer are among that row's kept tensors, or are its output
    # kept by the next layer as its input (the converter names a tensor after its producer)
    following = dict(zip(rows, list(rows.values())[1:]))
    for name, row in rows.items():
        own = collections.Counter((t["dtype"], t["bytes"]) for t in boundary
                                  if f"/{name}/" in t["name"])
        allowed = _kept_bytes(row.kept)
        if name in following:
            allowed = allowed + _kept_bytes(following[name].kept)
        assert not own - allowed, (name, own, row.kept)
        kept = _kept_bytes(row.kept)
        assert row.saved_activations == 8 * sum(n * c for (_, n), c in kept.items())


@pytest.mark.device_export
def test_device_layout_state_is_get_weights_and_file_constants(exported):
    from edge.runner import open_interpreter

    model, flatbuffer = exported
    profile = memory_profile(model, DEVICE_BATCH, layout="device")
    with tempfile.NamedTemporaryFile(suffix=".tflite") as f:
        f.write(flatbuffer)
        f.flush()
        state = open_interpreter(f.name).get_signature_runner("get_weights")()
    assert profile.state_bits() == 8 * sum(np.asarray(v).nbytes for v in state.values())
    # the file's constants: the init subgraph's initial values (one zeros per trainable
    # shape for Adam) plus the train graph's own small constants (bit weights, indices)
    from ai_edge_litert import schema_py_generated as schema

    buffers = schema.Model.GetRootAsModel(flatbuffer, 0)
    constant_bytes = sum(buffers.Buffers(i).DataLength() or buffers.Buffers(i).Size()
                         for i in range(buffers.BuffersLength()))
    modelled = profile.totals()["file_constants"] / 8
    assert abs(constant_bytes - modelled) <= 0.02 * modelled + 8192, (constant_bytes, modelled)

"""memory_profile against hand-computed bits for the paper's MLP."""
import pytest

import keras_coherence  # noqa: F401  (Keras 2 policy first)
from keras_coherence.binary import config as C
from keras_coherence.binary import models as bm
from keras_coherence.binary.memory import MemoryRow, memory_profile, memory_ratio

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


def test_ratios_are_in_the_papers_range_and_errors():
    assert 1.5 < memory_ratio("mlp", 100) < 3.0
    with pytest.raises(ValueError, match="batch_size"):
        memory_profile("mlp", 0)
    with pytest.raises(ValueError, match="Unknown optimizer"):
        memory_profile("mlp", 10, optimizer="rmsprop")
    with pytest.raises(ValueError, match="Unknown training method"):
        memory_profile("mlp", 10, method="tiny")

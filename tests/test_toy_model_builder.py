"""A model builder of your own is one decorated function: the toys below, registered from
the test folder, build by name through ``build_float_model`` / ``build_binary_model``
like the package's own builders. They are registered by a fixture and removed after
each test, so that other tests see the package's lists of names."""
import pytest

import keras_coherence  # noqa: F401  (first: selects Keras 2)
from keras_coherence import models
from keras_coherence._registry import Registry
from keras_coherence.binary import models as bm


def toy_mlp(input_shape=(28, 28, 1), num_classes=10, width=4):
    """Flatten -> Dense(width, relu) -> Dense(num_classes) logits."""
    return models.mlp(input_shape, num_classes, hidden=(width,), name="toy_mlp")


def toy_bnn(input_shape=(8, 8, 1), num_classes=2, method="standard"):
    """A binary MLP with one hidden layer of 8, for 8x8 images of 2 classes by default."""
    return bm.mlp(input_shape, num_classes, method=method, hidden=(8,), name="toy_bnn")


@pytest.fixture
def toys():
    models.register("toy_mlp", aliases=("tiny",))(toy_mlp)
    bm.register("toy_bnn")(toy_bnn)
    yield
    del models.FLOAT_MODELS["toy_mlp"]
    del bm.BINARY_MODELS["toy_bnn"]


def test_a_registered_float_builder_builds_by_name(toys):
    model = models.build_float_model("Toy_MLP", (6,), 3, width=5)  # names are case-insensitive
    assert model.name == "toy_mlp" and model.output_shape == (None, 3)
    assert model.count_params() == (6 * 5 + 5) + (5 * 3 + 3)
    assert models.build_float_model("tiny", (6,), 3).count_params() == (6 * 4 + 4) + (4 * 3 + 3)
    assert list(models.FLOAT_MODELS) == ["mlp", "cnn", "mobilenet_v1", "mobilenet_v2", "toy_mlp"]
    with pytest.raises(ValueError, match=r"Unknown model 'toy'\. Known models: mlp, cnn, mobilenet_v1, "
                                         r"mobilenet_v2, toy_mlp\. Did you mean toy_mlp\?"):
        models.build_float_model("toy")


def test_a_registered_binary_builder_builds_by_name_with_its_defaults(toys):
    assert bm.default_input_shape("toy_bnn") == ((8, 8, 1), 2)
    model = bm.build_binary_model("toy_bnn", "low_memory")
    assert model.name == "toy_bnn" and model.input_shape == (None, 8, 8, 1) and model.output_shape == (None, 2)
    assert "toy_bnn" in bm.BINARY_MODELS and "toy_bnn" not in models.FLOAT_MODELS


def test_a_taken_name_raises_unless_replace(toys):
    with pytest.raises(ValueError, match="The model name 'cnn' is taken by small_cnn; pick another name, "
                                         "or pass replace=True to override it"):
        models.register("cnn")(toy_mlp)
    with pytest.raises(ValueError, match="The model name 'small_cnn' is taken by small_cnn"):
        models.register("my_cnn", aliases=("small_cnn",))(toy_mlp)
    assert "my_cnn" not in models.FLOAT_MODELS  # a refused registration changes nothing
    models.register("cnn", replace=True)(toy_mlp)
    try:
        assert models.build_float_model("small_cnn", (6,), 3).name == "toy_mlp"  # the alias follows
    finally:
        models.FLOAT_MODELS["cnn"] = models.small_cnn
    assert models.build_float_model("cnn").name == "small_cnn"


def test_a_binary_builder_without_its_dataset_defaults_is_refused():
    def no_defaults(input_shape, num_classes, method="standard"):
        return toy_bnn(input_shape, num_classes, method)

    with pytest.raises(TypeError, match="needs the keyword arguments input_shape and num_classes, with its "
                                        "dataset's values as defaults, and method"):
        bm.register("no_defaults")(no_defaults)
    assert "no_defaults" not in bm.BINARY_MODELS


def test_every_extension_point_uses_the_one_registry():
    from keras_coherence.aggregation.aggregators import AGGREGATORS
    from keras_coherence.coherence.registry import RULES
    from keras_coherence.quantization import quantizers

    for table in (RULES, AGGREGATORS, quantizers.ALIASES, quantizers.METHODS, models.FLOAT_MODELS,
                  bm.BINARY_MODELS):
        assert isinstance(table, Registry)


def test_a_registered_float_builder_is_a_command_line_model(toys, tmp_path):
    """The command line reads its --model choices from the registry when it checks them."""
    import json

    from keras_coherence import cli

    out = tmp_path / "run"
    assert cli.main(["coherence", "--model", "toy_mlp", "--max-train", "64", "--epochs", "1", "--batch-size", "32",
                     "--probe-size", "8", "--quiet", "--no-per-layer", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    # 784 inputs -> 4 -> 10: the toy's default width, on the embedded MNIST
    assert summary["model"] == {"name": "toy_mlp", "parameters": (784 * 4 + 4) + (4 * 10 + 10)}

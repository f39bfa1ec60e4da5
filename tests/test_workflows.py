"""The workflows from Python, without argv: configs check their values as the command line
does, the command line's options are exactly the configs' fields, and a run returns the
summary it writes."""
import dataclasses
import json

import pytest

from keras_coherence import cli
from keras_coherence.workflows import ConfigError, aggregate, bnn, coherence, demo, edge, quantize

CONFIGS = [coherence.Config, aggregate.Config, quantize.Config, bnn.Config, demo.Config, edge.ExportConfig,
           edge.LceConfig, edge.KerasTrainConfig]


@pytest.mark.parametrize("config_class, kwargs, fragment", [
    (coherence.Config, {"epochs": 0}, "--epochs: 0 must be a positive integer"),
    (coherence.Config, {"label_noise": 1.5}, "--label-noise: 1.5 must be a fraction in [0, 1]"),
    (coherence.Config, {"model": "resnet"}, "--model: invalid choice 'resnet'"),
    (coherence.Config, {"hidden": "12,x"}, "--hidden: '12,x' must be comma-separated layer widths"),
    (aggregate.Config, {"lr": -1.0}, "--lr: -1.0 must be a positive number"),
    (quantize.Config, {"bits": 9}, "--bits: invalid choice 9"),
    (quantize.Config, {"method": "nope"}, "--method: invalid choice 'nope'"),
    (bnn.Config, {"optimizer": "sgd"}, "--optimizer: invalid choice 'sgd'"),
    (demo.Config, {"only": ("nope",)}, "--only: unknown section(s) nope"),
])
def test_bad_values_raise_config_error_naming_the_option(config_class, kwargs, fragment):
    with pytest.raises(ConfigError) as info:
        config_class(**kwargs)
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)


def test_values_are_normalized_as_on_the_command_line():
    config = coherence.Config(hidden="32, 16", epochs="3", lr="0.5")
    assert (config.hidden, config.epochs, config.lr) == ((32, 16), 3, 0.5)


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_each_subcommand_has_one_option_per_documented_field(name):
    command = cli.COMMANDS[name]
    config_class = getattr(cli._module(command), command.config)
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command").choices[name]
    dests = {a.dest for a in sub._actions} - {"help"} - ({"out"} if command.staged else set())
    assert dests == {f.name for f in dataclasses.fields(config_class) if f.metadata.get("help")}
    defaults = sub.parse_args([] if not any(a.required for a in sub._actions) else
                              [x for a in sub._actions if a.required for x in (a.option_strings[0], "v")])
    built = cli.config_from_args(argparse_namespace(defaults, name))
    assert isinstance(built, config_class)
    for field in dataclasses.fields(config_class):
        if field.metadata.get("help") and not field.metadata.get("required"):
            assert getattr(built, field.name) == field.default, field.name


def argparse_namespace(args, name):
    args.command = name
    return args


def test_coherence_run_from_python_returns_the_summary_it_writes(tmp_path):
    lines = []
    config = coherence.Config(max_train=128, epochs=1, batch_size=32, probe_size=16, every_n_steps=2,
                              hidden=(8,), quiet=True, per_layer=False)
    summary = coherence.run(config, str(tmp_path), log=lines.append)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert summary["data"]["num_train"] == 128 and summary["training"]["steps"] == 4
    assert summary["config"]["hidden"] == [8] and summary["config"]["probe_size"] == 16
    assert any("m-coherence: first" in line for line in lines)


def test_a_run_refuses_what_only_the_data_can_tell(tmp_path):
    config = aggregate.Config(aggregator="winsorized:c=5", max_train=210, batch_size=50, quiet=True)
    with pytest.raises(ConfigError, match=r"last batch \(210 % 50\) has 10"):
        aggregate.run(config, str(tmp_path))

"""Base for Functional models that add their own ``train_step`` and a few extra
constructor arguments, with save/load through the usual Keras config."""
from keras_coherence._internals.keras_graph import functional_config, functional_from_config
from keras_coherence._keras import keras


class FunctionalWithExtras(keras.Model):
    """Subclasses list their extra keyword arguments (JSON-serializable values) in
    ``EXTRA_CONFIG``; ``get_config``/``from_config`` carry them next to the graph."""

    EXTRA_CONFIG = ()

    def _extra_config(self):
        return {name: getattr(self, name) for name in self.EXTRA_CONFIG}

    def get_config(self):
        config = functional_config(self)
        config.update(self._extra_config())
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        extras = {name: config.pop(name) for name in cls.EXTRA_CONFIG if name in config}
        return functional_from_config(
            config, custom_objects,
            lambda inputs, outputs: cls(inputs=inputs, outputs=outputs, name=config.get("name"), **extras))

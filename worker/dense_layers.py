"""sentence-transformers' Dense modules: the projection some models apply after pooling.

LaBSE, distiluse-base-multilingual and sentence-t5 end in a Dense module (a linear layer
and an activation, 768 -> 512 floats for distiluse): their sentence embedding is that
layer's output, not the pooled transformer output. A server that pooled and stopped would
answer vectors of the wrong size that match nothing the model made.

:func:`load` reads one module's folder as sentence-transformers saves it (``config.json``
plus ``model.safetensors`` or ``pytorch_model.bin``) and returns a :class:`DenseLayer`, or
raises :class:`UnsupportedDense` naming what it cannot honour: a residual connection,
another input or output than the sentence embedding, an activation that is not a
``torch.nn`` module class. The worker then refuses embeddings rather than answer wrong ones.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

#: The weight files sentence-transformers writes for a module, in the order it reads them.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class UnsupportedDense(ValueError):
    """A Dense module batchwire cannot run exactly as sentence-transformers does."""


@dataclass(frozen=True)
class DenseLayer:
    """``activation(weight @ x + bias)`` on one pooled vector (a torch tensor)."""

    path: str
    weight: Any
    bias: Any
    activation: Any

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    def __call__(self, vector: Any) -> Any:
        import torch

        return self.activation(torch.nn.functional.linear(vector, self.weight, self.bias))


def _activation(name: Any) -> Any:
    # sentence-transformers' own rule without trust_remote_code: a torch.nn.Module class.
    import torch

    if not isinstance(name, str) or not name.startswith("torch."):
        raise UnsupportedDense(f"its activation {name!r} is not a torch.nn module")
    module_name, _, class_name = name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise UnsupportedDense(f"its activation {name!r} cannot be imported ({exc})") from None
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise UnsupportedDense(f"its activation {name!r} is not a torch.nn module class")
    return cls()


def load(read_json: Callable[[str], Any], find_file: Callable[[str], Any], path: str,
         device: Any) -> DenseLayer:
    """The Dense module in folder ``path`` of a model. ``read_json(name)`` and
    ``find_file(name)`` read the model's files (a directory or the hub cache)."""
    import torch

    config = read_json(f"{path}/config.json")
    if not isinstance(config, dict):
        raise UnsupportedDense(f"{path}/config.json is missing or not a JSON object")
    if config.get("use_residual"):
        raise UnsupportedDense("it adds a residual connection")
    for key in ("module_input_name", "module_output_name"):
        if config.get(key) not in (None, "sentence_embedding"):
            raise UnsupportedDense(f"its {key} is {config[key]!r}, not the sentence embedding")
    activation = _activation(config.get("activation_function",
                                        "torch.nn.modules.activation.Tanh"))
    weights_file = next((f for f in (find_file(f"{path}/{name}") for name in WEIGHT_FILES)
                         if f is not None), None)
    if weights_file is None:
        raise UnsupportedDense(f"{path} has none of {', '.join(WEIGHT_FILES)}")
    if str(weights_file).endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(str(weights_file))
    else:
        state = torch.load(str(weights_file), map_location="cpu", weights_only=True)
    weight = state.get("linear.weight")
    bias = state.get("linear.bias")
    shape = (config.get("out_features"), config.get("in_features"))
    if weight is None or tuple(weight.shape) != shape:
        raise UnsupportedDense(f"its weights are not a linear layer of shape {shape}")
    if config.get("bias", True) != (bias is not None):
        raise UnsupportedDense("its bias does not match its config")
    weight = weight.float().to(device)
    bias = bias.float().to(device) if bias is not None else None
    return DenseLayer(path, weight, bias, activation.to(device))

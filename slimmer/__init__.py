"""slimmer: compress a trained PyTorch CNN by low-rank rewriting, pruning and brief fine-tuning.

Public API::

    model = slimmer.load_model("model.pt", architecture="examples.cifar_resnet:resnet56")
    compressed, report = slimmer.apply(model, "recipes/resnet56-half-macs.yaml")

Each stage is callable on its own: :func:`decompose`, :func:`prune`, :func:`finetune`,
:func:`export_onnx`, :func:`check_parity`, :func:`count_macs`, :func:`measure_latency`.
"""

__version__ = "0.1.0"

from slimmer.cost import count_macs, count_params, measure_latency
from slimmer.decompose import decompose
from slimmer.errors import CheckFailedError, DataError, InputError, ModelLoadError, RecipeError, SlimmerError
from slimmer.export import check_parity, export_onnx
from slimmer.finetune import finetune
from slimmer.model_io import load_compressed, load_model
from slimmer.pipeline import apply
from slimmer.prune import prune
from slimmer.recipe import Recipe, load_recipe, recipe_from_dict

__all__ = [
    "__version__", "apply", "load_model", "load_compressed", "load_recipe", "recipe_from_dict", "Recipe",
    "decompose", "prune", "finetune", "export_onnx", "check_parity", "count_macs", "count_params",
    "measure_latency", "SlimmerError", "InputError", "RecipeError", "ModelLoadError", "DataError",
    "CheckFailedError",
]

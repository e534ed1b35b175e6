"""Loading models safely and saving compressed ones.

``model.pt`` may be a checkpoint dict, a bare state_dict, or (only when the user opts in) a whole
pickled ``nn.Module``. Checkpoints are read with ``torch.load(weights_only=True)``, which cannot
run code from the file. A path ending in ``.safetensors`` is read as a flat state_dict with the
optional ``safetensors`` package. The input file is only ever opened for reading.
"""

from __future__ import annotations

import importlib
import io
import logging
import pickle
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from slimmer.errors import ModelLoadError
from slimmer.graph import get_module, set_module
from slimmer.layers import REPLACEMENT_FORMS

logger = logging.getLogger(__name__)

COMPRESSED_FORMAT = "slimmer.compressed/1"
AUTO_KEYS = ("state_dict", "model_state_dict", "model")


def import_callable(target: str, search_path: list[Path] | None = None, label: str = "callable") -> Callable[..., Any]:
    """Import ``'package.module:attribute'``; ``search_path`` folders are tried first."""
    module_name, separator, attribute = target.partition(":")
    if not separator or not module_name or not attribute:
        raise ModelLoadError(f"{label} {target!r} is not 'package.module:callable' (for example 'torchvision.models:resnet18')")
    added = [str(folder) for folder in search_path or [] if str(folder) not in sys.path]
    sys.path[:0] = added
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ModelLoadError(f"cannot import module {module_name!r} for {label} {target!r}: {error}; "
                             "check the name and model.python_path") from None
    finally:
        for folder in added:
            sys.path.remove(folder)
    try:
        found = getattr(module, attribute)
    except AttributeError:
        raise ModelLoadError(f"module {module_name!r} has no attribute {attribute!r} ({label} {target!r})") from None
    if not callable(found):
        raise ModelLoadError(f"{label} {target!r} is not callable")
    return found


def build_architecture(architecture: str, kwargs: dict[str, Any], search_path: list[Path] | None = None) -> nn.Module:
    builder = import_callable(architecture, search_path, "model.architecture")
    try:
        model = builder(**kwargs)
    except TypeError as error:
        raise ModelLoadError(f"model.architecture {architecture!r} rejected kwargs {kwargs}: {error}") from None
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"model.architecture {architecture!r} returned {type(model).__name__}, not an nn.Module")
    return model


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelLoadError(f"model path is not a file: {path}")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"model file is empty: {path}")


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    """Check for a safetensors header: a little-endian 64-bit length, then that many bytes of JSON."""
    if len(head) < 9:
        return False
    header_length = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 8 + header_length <= size


def _sniff_format(path: Path) -> str:
    """Return 'zip', 'torchscript', 'legacy' (pickle-based torch.save), 'safetensors' or 'unknown'."""
    with path.open("rb") as handle:
        head = handle.read(9)
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile:
            return "unknown"
        if any(name.endswith("/constants.pkl") or "/code/" in name for name in names):
            return "torchscript"
        if any(name.endswith("/data.pkl") or name == "data.pkl" for name in names):
            return "zip"
        return "unknown"
    if head[:1] == b"\x80":
        return "legacy"
    if head[:4] == b"PK\x03\x04":
        # A zip local-file header without a readable central directory: a truncated archive,
        # which torch.load then reports as corrupt or truncated.
        return "zip"
    if _looks_like_safetensors(head, path.stat().st_size):
        return "safetensors"
    return "unknown"


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise ModelLoadError(f"reading {path} needs the safetensors package: pip install safetensors "
                             "(or pip install 'slimmer[safetensors]')") from None
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as error:
        detail = " ".join(str(error).split()) or type(error).__name__
        raise ModelLoadError(f"cannot read {path}: not a valid safetensors file ({detail})") from None


def _torch_load(path: Path, weights_only: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError:
        raise
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as error:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"cannot read {path}: the file is corrupt or truncated ({detail})") from None


def read_checkpoint(path: str | Path, allow_pickle: bool = False, search_path: list[Path] | None = None) -> Any:
    """Read ``path`` with torch.load; a whole pickled module needs ``allow_pickle``.

    ``search_path`` folders are on ``sys.path`` while a pickled module is unpickled, so that its classes import.
    """
    path = Path(path)
    _check_file(path)
    if is_safetensors_path(path):
        return _read_safetensors(path)
    kind = _sniff_format(path)
    if kind == "torchscript":
        raise ModelLoadError(
            f"{path} is a TorchScript archive; slimmer rewrites nn.Module code, so save the eager model's "
            "state_dict (torch.save(model.state_dict(), path)) and name its class in model.architecture"
        )
    if kind == "safetensors":
        raise ModelLoadError(
            f"{path} looks like a safetensors file; rename it to end in .safetensors so that slimmer reads it "
            "with the safetensors package"
        )
    if kind == "unknown":
        raise ModelLoadError(
            f"{path} is not a PyTorch checkpoint (expected a file written by torch.save, such as a state_dict)"
        )
    try:
        return _torch_load(path, weights_only=True)
    except pickle.UnpicklingError:
        if not allow_pickle:
            raise ModelLoadError(
                f"{path} contains pickled Python objects (for example a whole nn.Module), and unpickling runs code "
                "from the file; if you trust it, pass --allow-pickle (allow_pickle=True in Python, "
                "model.allow_pickle: true in a recipe), otherwise save model.state_dict() instead"
            ) from None
        logger.warning("Unpickling %s with weights_only=False because allow_pickle is set", path)
        added = [str(folder) for folder in search_path or [] if str(folder) not in sys.path]
        sys.path[:0] = added
        try:
            return _torch_load(path, weights_only=False)
        except (pickle.UnpicklingError, AttributeError, ModuleNotFoundError) as inner:
            raise ModelLoadError(f"cannot unpickle {path}: {inner}; the classes it names must be importable "
                                 "(add their folder to search_path or model.python_path)") from None
        finally:
            for folder in added:
                sys.path.remove(folder)


def is_safetensors_path(path: Path) -> bool:
    return path.suffix.lower() == ".safetensors"


def _find_state_dict(checkpoint: Any, key: str | None, path: Path) -> dict[str, torch.Tensor]:
    if is_safetensors_path(path) and key not in ("auto", None):
        raise ModelLoadError(
            f"{path} is a safetensors file, which contains one flat state_dict without keys like {key!r}; "
            "set model.state_dict_key to auto or null"
        )
    if not isinstance(checkpoint, Mapping):
        raise ModelLoadError(f"{path} contains a {type(checkpoint).__name__}, expected a state_dict or a checkpoint dict")
    if key == "auto":
        if checkpoint and all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
            return dict(checkpoint)
        for candidate in AUTO_KEYS:
            if isinstance(checkpoint.get(candidate), Mapping):
                return dict(checkpoint[candidate])
        raise ModelLoadError(
            f"{path} has keys {sorted(map(str, checkpoint))[:8]} and no state_dict among them; "
            "set model.state_dict_key to the key that holds the weights"
        )
    if key is None:
        return dict(checkpoint)
    if key not in checkpoint:
        raise ModelLoadError(
            f"{path} has no key {key!r} (found {sorted(map(str, checkpoint))[:8]}); fix model.state_dict_key"
        )
    if not isinstance(checkpoint[key], Mapping):
        raise ModelLoadError(f"{path}[{key!r}] is a {type(checkpoint[key]).__name__}, not a state_dict")
    return dict(checkpoint[key])


def _strip_prefix(state_dict: dict[str, Any], prefix: str | None) -> dict[str, Any]:
    if prefix and state_dict and all(key.startswith(prefix) for key in state_dict):
        return {key[len(prefix):]: value for key, value in state_dict.items()}
    return state_dict


def load_state_dict_strict(model: nn.Module, state_dict: dict[str, Any], source: str) -> None:
    """Load ``state_dict`` into ``model``; on any mismatch, raise with missing, unexpected and resized keys."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    resized = [
        f"{key} {tuple(state_dict[key].shape)} vs {tuple(expected[key].shape)}"
        for key in expected
        if key in state_dict and hasattr(state_dict[key], "shape") and state_dict[key].shape != expected[key].shape
    ]
    if missing or unexpected or resized:
        parts = []
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch (file vs model)", resized)):
            if keys:
                listed = ", ".join(keys[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")
                parts.append(f"{label}: {listed}")
        raise ModelLoadError(
            f"checkpoint {source} does not fit the architecture: {'; '.join(parts)}; "
            "check model.architecture, its kwargs, model.state_dict_key and model.strip_prefix"
        )
    model.load_state_dict(state_dict, strict=True)


def load_model(
    path: str | Path,
    architecture: str | None = None,
    kwargs: dict[str, Any] | None = None,
    state_dict_key: str | None = "auto",
    strip_prefix: str | None = "module.",
    allow_pickle: bool = False,
    search_path: list[Path] | None = None,
) -> nn.Module:
    """Load ``model.pt`` into an ``nn.Module`` in eval mode.

    A state_dict (bare or inside a checkpoint) goes into ``architecture`` (``'package.module:callable'``),
    strictly. A whole pickled module is accepted only with ``allow_pickle``.
    """
    model, _ = load_model_and_source(path, architecture, kwargs, state_dict_key, strip_prefix, allow_pickle,
                                     search_path)
    return model


def load_model_and_source(
    path: str | Path,
    architecture: str | None = None,
    kwargs: dict[str, Any] | None = None,
    state_dict_key: str | None = "auto",
    strip_prefix: str | None = "module.",
    allow_pickle: bool = False,
    search_path: list[Path] | None = None,
) -> tuple[nn.Module, dict[str, Any] | None]:
    """Load like :func:`load_model`; also return how to rebuild the model's class, or None for a pickled module.

    The second value is ``{"architecture", "kwargs", "python_path"}``, as :func:`save_compressed` takes it.
    """
    path = Path(path)
    checkpoint = read_checkpoint(path, allow_pickle=allow_pickle, search_path=search_path)

    if isinstance(checkpoint, Mapping) and checkpoint.get("format") == COMPRESSED_FORMAT:
        model = load_compressed(path, search_path=search_path, checkpoint=checkpoint)
        return model, None if isinstance(checkpoint.get("model"), nn.Module) else checkpoint["architecture"]
    if isinstance(checkpoint, nn.Module):
        if isinstance(checkpoint, torch.jit.ScriptModule):
            raise ModelLoadError(f"{path} contains a TorchScript module; save the eager model's state_dict instead")
        return checkpoint.eval(), None
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("model"), nn.Module):
        return checkpoint["model"].eval(), None

    state_dict = _strip_prefix(_find_state_dict(checkpoint, state_dict_key, path), strip_prefix)
    if architecture is None:
        raise ModelLoadError(
            f"{path} contains a state_dict, so the recipe must name the model class: "
            "set model.architecture to 'package.module:callable'"
        )
    model = build_architecture(architecture, kwargs or {}, search_path)
    load_state_dict_strict(model, state_dict, str(path))
    source = {"architecture": architecture, "kwargs": dict(kwargs or {}),
              "python_path": [str(folder) for folder in search_path or []]}
    return model.eval(), source


def _resize_to_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Give conv, batch-norm and linear layers the channel counts their saved weights have (after pruning)."""
    for name, module in list(model.named_modules()):
        weight = state_dict.get(f"{name}.weight" if name else "weight")
        if weight is None or not hasattr(module, "weight") or module.weight is None:
            continue
        if tuple(weight.shape) == tuple(module.weight.shape):
            continue
        if isinstance(module, nn.Conv2d):
            new: nn.Module = nn.Conv2d(
                weight.shape[1] * module.groups, weight.shape[0], module.kernel_size, module.stride,
                module.padding, module.dilation, module.groups, module.bias is not None, module.padding_mode,
            )
        elif isinstance(module, nn.BatchNorm2d):
            new = nn.BatchNorm2d(weight.shape[0], module.eps, module.momentum, module.affine, module.track_running_stats)
        elif isinstance(module, nn.Linear):
            new = nn.Linear(weight.shape[1], weight.shape[0], module.bias is not None)
        else:
            continue
        set_module(model, name, new)


def replacement_specs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Return the ``spec()`` of every replacement module in ``model``, by qualified name, as save_compressed takes them."""
    forms = tuple(REPLACEMENT_FORMS.values())
    return {name: module.spec() for name, module in model.named_modules() if isinstance(module, forms)}


def save_compressed(model: nn.Module, path: str | Path, architecture: dict[str, Any] | None,
                    replacements: dict[str, dict[str, Any]]) -> None:
    """Write the compressed model: its state_dict plus what is needed to rebuild its structure.

    With ``architecture`` (``{"architecture", "kwargs", "python_path"}``) the file loads with
    ``weights_only=True`` through :func:`load_compressed`. Without it (the input was a pickled module)
    the whole module is pickled, and loading it needs the same opt-in as the input did.
    """
    buffer = io.BytesIO()
    torch.save(compressed_payload(model, architecture, replacements), buffer)
    Path(path).write_bytes(buffer.getvalue())


def compressed_payload(model: nn.Module, architecture: dict[str, Any] | None,
                       replacements: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Return what :func:`save_compressed` writes; :func:`load_compressed` takes it as ``checkpoint``."""
    payload: dict[str, Any] = {
        "format": COMPRESSED_FORMAT,
        "architecture": architecture,
        "replacements": replacements,
        "state_dict": model.state_dict(),
    }
    if architecture is None:
        payload["model"] = model
    return payload


def load_compressed(path: str | Path, search_path: list[Path] | None = None,
                    checkpoint: Mapping[str, Any] | None = None, allow_pickle: bool = False) -> nn.Module:
    """Rebuild a model written by :func:`save_compressed` and load its weights.

    A file saved without an architecture contains the whole pickled module and needs ``allow_pickle``.
    """
    path = Path(path)
    if checkpoint is None:
        checkpoint = read_checkpoint(path, allow_pickle=allow_pickle, search_path=search_path)
    if not isinstance(checkpoint, Mapping) or checkpoint.get("format") != COMPRESSED_FORMAT:
        raise ModelLoadError(f"{path} is not a model written by slimmer ({COMPRESSED_FORMAT})")
    if isinstance(checkpoint.get("model"), nn.Module):
        return checkpoint["model"].eval()

    architecture = checkpoint["architecture"]
    folders = [Path(folder) for folder in architecture.get("python_path", [])] + list(search_path or [])
    model = build_architecture(architecture["architecture"], architecture.get("kwargs", {}), folders)
    for name, spec in checkpoint["replacements"].items():
        form = REPLACEMENT_FORMS.get(spec.get("form"))
        if form is None:
            raise ModelLoadError(f"{path}: unknown replacement form {spec.get('form')!r} at {name}")
        get_module(model, name)
        set_module(model, name, form.from_spec(spec))
    _resize_to_state_dict(model, checkpoint["state_dict"])
    load_state_dict_strict(model, dict(checkpoint["state_dict"]), str(path))
    return model.eval()

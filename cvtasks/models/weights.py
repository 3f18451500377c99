"""Resolve a ``model.weights`` spec to a state dict, without ever downloading.

Specs:
    ``scratch``   random initialisation (no state dict)
    ``imagenet``  the torchvision weights enum's default entry, read from the local torch hub cache only
                  (``<torch.hub.get_dir()>/checkpoints/<file name of the enum's url>``); absent -> an error naming
                  that file, because training machines may have no internet
    a file path   (or URI readable by :mod:`cvtasks.storage`) holding a state dict, a checkpoint dict with a
                  ``model`` / ``state_dict`` entry, or a whole ``nn.Module`` saved with ``torch.save``

The pipeline layer turns MLflow model URIs into such a file before a task sees the spec.
"""

from __future__ import annotations

import io
import logging
import pickle
from collections.abc import Mapping
from enum import Enum
from pathlib import Path

import torch
from torch import nn
from torchvision.models import ResNet18_Weights

from cvtasks import storage
from cvtasks.errors import DataFormatError

log = logging.getLogger(__name__)

SCRATCH = "scratch"
IMAGENET = "imagenet"
#: Entries of a checkpoint dict that may hold the model's state dict (raycv's own checkpoints use "model").
CHECKPOINT_KEYS = ("model", "state_dict")
#: Prefixes a saved state dict may put before the backbone's own keys: DDP's wrapper, a model holding the
#: backbone as ``.backbone`` (e.g. raycv's FCN), or both.
KEY_PREFIXES = ("", "module.", "backbone.", "module.backbone.")
#: Classifier head of torchvision's ResNet-18, never part of the backbone.
RESNET_HEAD_PREFIX = "fc."

StateDict = dict[str, torch.Tensor]


def imagenet_cache_file(weights: Enum) -> Path:
    """Where ``torch.hub`` keeps the file of a torchvision weights entry (e.g. ``ResNet18_Weights.IMAGENET1K_V1``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


def resolve_state_dict(spec: str, weights_enum: type[Enum]) -> tuple[StateDict | None, str]:
    """(state dict or None for ``scratch``, a one-line description of where the weights came from)."""
    if spec == SCRATCH:
        return None, "scratch (random initialisation)"
    if spec == IMAGENET:
        entry = weights_enum.DEFAULT
        cache = imagenet_cache_file(entry)
        if not cache.is_file():
            raise FileNotFoundError(
                f"model.weights=imagenet needs {weights_enum.__name__}.{entry.name} in the local torch hub cache: "
                f"expected file {cache} (copy {entry.url} there, or set model.weights to scratch or a file path)"
            )
        return torch.load(cache, map_location="cpu", weights_only=True), f"imagenet: {weights_enum.__name__}." \
                                                                         f"{entry.name} ({cache})"
    if not storage.exists(spec):
        raise ValueError(f'model.weights "{spec}" is neither {SCRATCH}, {IMAGENET} nor an existing file')
    return load_state_dict_file(spec), f"file: {spec}"


def load_state_dict_file(path: str) -> StateDict:
    """A state dict from a file holding a state dict, a checkpoint dict or a pickled ``nn.Module``.

    Tensor-only files load with ``weights_only=True``. A whole pickled module cannot load that way; it is then
    unpickled in full, which runs code from the file, so only point this at files you trust (a warning is logged).
    """
    data = storage.read_bytes(path)
    try:
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        log.warning("%s is not a plain state dict; unpickling it in full (trusted files only)", path)
        try:
            loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
        except Exception as exc:
            raise DataFormatError(path, f"not a loadable torch file ({exc})") from exc
    except (RuntimeError, EOFError) as exc:
        raise DataFormatError(path, f"not a loadable torch file ({exc})") from exc
    if isinstance(loaded, nn.Module):
        return loaded.state_dict()
    if isinstance(loaded, Mapping):
        for key in CHECKPOINT_KEYS:
            if isinstance(loaded.get(key), Mapping):
                loaded = loaded[key]
                break
        if all(isinstance(v, torch.Tensor) for v in loaded.values()):
            return dict(loaded)
    raise DataFormatError(path, f"expected a state dict, checkpoint dict or nn.Module, got {type(loaded).__name__}")


def load_backbone_state(backbone: nn.Module, state_dict: StateDict, source: str,
                        skip_prefix: str = RESNET_HEAD_PREFIX) -> None:
    """Copy ``state_dict`` into every parameter and buffer of ``backbone`` except those under ``skip_prefix``.

    The source keys may carry one of ``KEY_PREFIXES``; keys the backbone lacks (a classifier head, an FCN's
    upsampling layers) are ignored. A backbone key missing from the source or with another shape raises
    ``ValueError`` naming ``source``.
    """
    wanted = {k: v for k, v in backbone.state_dict().items() if not k.startswith(skip_prefix)}
    prefix = next((p for p in KEY_PREFIXES if all(p + k in state_dict for k in wanted)), None)
    if prefix is None:
        missing = sorted(k for k in wanted if k not in state_dict)
        raise ValueError(f"{source}: weights do not fit the backbone; {len(missing)} keys missing, e.g. {missing[:3]}")
    selected = {k: state_dict[prefix + k] for k in wanted}
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(wanted[k].shape)}" for k, v in selected.items()
             if v.shape != wanted[k].shape]
    if wrong:
        raise ValueError(f"{source}: weights have other shapes than the backbone, e.g. {wrong[:3]}")
    backbone.load_state_dict(selected, strict=False)


def load_resnet18_backbone_weights(spec: str, model: nn.Module) -> str:
    """Load ResNet-18 weights named by ``spec`` into ``model``'s feature layers (not ``fc``); returns a description.

    ``model`` has torchvision ResNet-18 key names (``conv1.weight``, ``layer4.1.bn2.running_var``, ...): a
    torchvision ``resnet18`` with any head, or a backbone built from its children. ``scratch`` leaves it untouched.
    """
    state_dict, description = resolve_state_dict(spec, ResNet18_Weights)
    if state_dict is not None:
        load_backbone_state(model, state_dict, description)
    return description

"""Resolve a ``model.weights`` spec to a state dict, without ever downloading.

Specs:
    ``scratch``   random initialisation (no state dict)
    ``imagenet``  the torchvision weights enum's default entry, read from the local torch hub cache only
                  (``<torch.hub.get_dir()>/checkpoints/<file name of the enum's url>``); absent -> an error naming
                  that file, because training machines may have no internet
    a file path   (or URI readable by :mod:`cvtasks.storage`) holding a state dict or a checkpoint dict with a
                  ``model`` / ``state_dict`` entry

Every file is read with ``torch.load(weights_only=True)``: tensors, numbers, strings and containers only. Nothing in
a weights file is ever executed, so a whole ``nn.Module`` saved with ``torch.save(model)`` (a pickle of code) is
refused; save ``model.state_dict()`` instead. The pipeline layer turns MLflow model URIs into a state dict before a
task sees the spec.
"""

from __future__ import annotations

import io
import logging
import pickle
import re
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any

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


def weights_file(spec: str, weights_enum: type[Enum]) -> str | None:
    """The file a ``scratch`` / ``imagenet`` / path spec reads (None for ``scratch``), checked to exist.

    Cheap (nothing is loaded), so the driver calls it before starting anything: a missing file fails in seconds.
    """
    if spec == SCRATCH:
        return None
    if spec == IMAGENET:
        entry = weights_enum.DEFAULT
        cache = imagenet_cache_file(entry)
        if not cache.is_file():
            raise FileNotFoundError(
                f"model.weights=imagenet needs {weights_enum.__name__}.{entry.name} in the local torch hub cache: "
                f"expected file {cache} (copy {entry.url} there, or set model.weights to scratch or a file path)"
            )
        return str(cache)
    if not storage.exists(spec):
        raise ValueError(f'model.weights "{spec}" is neither {SCRATCH}, {IMAGENET} nor an existing file')
    return spec


def resolve_state_dict(spec: str, weights_enum: type[Enum]) -> tuple[StateDict | None, str]:
    """(state dict or None for ``scratch``, a one-line description of where the weights came from)."""
    path = weights_file(spec, weights_enum)
    if path is None:
        return None, "scratch (random initialisation)"
    if spec == IMAGENET:
        return load_state_dict_file(path), f"imagenet: {weights_enum.__name__}.{weights_enum.DEFAULT.name} ({path})"
    return load_state_dict_file(path), f"file: {spec}"


def load_state_dict_file(path: str) -> StateDict:
    """A state dict from a tensor-only file holding a state dict or a checkpoint dict (see ``CHECKPOINT_KEYS``).

    Loaded with ``weights_only=True`` only: a file that needs full unpickling (a pickled ``nn.Module``, or anything
    that would run code) raises ``DataFormatError`` naming ``path``; nothing from it is executed.
    """
    loaded = load_tensor_file(path, "weights file", "a whole pickled nn.Module is refused too: save "
                                                    "model.state_dict() instead")
    if isinstance(loaded, Mapping):
        for key in CHECKPOINT_KEYS:
            if isinstance(loaded.get(key), Mapping):
                loaded = loaded[key]
                break
        if all(isinstance(v, torch.Tensor) for v in loaded.values()):
            return dict(loaded)
    raise DataFormatError(path, f"expected a state dict or checkpoint dict, got {type(loaded).__name__}")


def load_tensor_file(path: str, kind: str, hint: str) -> Any:
    """``torch.load(weights_only=True)`` of the file (or URI) at ``path``: tensors, numbers, strings, containers.

    A file that would need full unpickling raises ``DataFormatError`` naming ``path``, the ``kind`` of file expected,
    the global it asked for and ``hint`` (what to do instead); nothing from it is executed. Torch's own message is
    not passed on: it suggests retrying with ``weights_only=False``, which is exactly what must not happen.
    """
    data = storage.read_bytes(path)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        needs = re.search(r"GLOBAL (\S+)|Unsupported operand \d+", str(exc))
        reason = "" if needs is None else f" (it asks for {needs.group(1)})" if needs.group(1) else \
            f" ({needs.group(0).lower()})"
        raise DataFormatError(path, f"not a tensor-only {kind}, refused{reason}: raycv loads torch files with "
                                    f"weights_only=True and never unpickles code; {hint}") from None
    except (RuntimeError, EOFError) as exc:
        raise DataFormatError(path, f"not a loadable torch file ({exc})") from exc


def load_backbone_state(backbone: nn.Module, state_dict: StateDict, source: str,
                        skip_prefix: str | None = RESNET_HEAD_PREFIX, prefixes: tuple[str, ...] = KEY_PREFIXES,
                        what: str = "the backbone") -> None:
    """Copy ``state_dict`` into every parameter and buffer of ``backbone`` except those under ``skip_prefix``.

    The source keys may carry one of ``prefixes``; keys the backbone lacks (a classifier head, an FCN's upsampling
    layers, the deeper layers of a truncated VGG) are ignored. A backbone key missing from the source or with
    another shape raises ``ValueError`` naming ``source`` and ``what`` the weights were for.
    """
    wanted = {k: v for k, v in backbone.state_dict().items() if not (skip_prefix and k.startswith(skip_prefix))}
    prefix = next((p for p in prefixes if all(p + k in state_dict for k in wanted)), None)
    if prefix is None:
        missing = sorted(k for k in wanted if k not in state_dict)
        raise ValueError(f"{source}: weights do not fit {what}; {len(missing)} keys missing, e.g. {missing[:3]}")
    selected = {k: state_dict[prefix + k] for k in wanted}
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(wanted[k].shape)}" for k, v in selected.items()
             if v.shape != wanted[k].shape]
    if wrong:
        raise ValueError(f"{source}: weights have other shapes than {what}, e.g. {wrong[:3]}")
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

import contextlib
import glob
import json
import os
from collections import defaultdict

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from nanovllm.layers.linear import default_weight_loader

CONFIG_HINT = "does config.json match the weights?"


@torch.no_grad()
def load_model(model: nn.Module, path: str):
    """Copy the checkpoint's *.safetensors into `model`, each parameter taking its own (tensor-parallel) shard.

    The model says which checkpoint tensors are parts of one fused parameter (`packed_modules_mapping`),
    which it does not need (`skipped_checkpoint_tensors`), and which must be copies of another one because
    its config ties them (`tied_checkpoint_tensors`: name -> the tensor it copies); each parameter's
    `weight_loader` copies its slice. Anything else that does not fit is an error naming the file or the
    tensors, raised before any weight is read where the names suffice: a file that cannot be read, tensors
    the model does not have, parameters (or parts) the checkpoint lacks, a tied copy that is no copy, a shape
    that does not match.
    """
    files = checkpoint_files(path)
    params = dict(model.named_parameters())
    packed = getattr(model, "packed_modules_mapping", {})
    skipped = getattr(model, "skipped_checkpoint_tensors", ())
    tied = getattr(model, "tied_checkpoint_tensors", {})
    targets, where = {}, {}  # checkpoint name -> (parameter name, shard id); checkpoint name -> file
    for file in files:
        with _open(file) as f:
            targets.update((name, _target(name, packed)) for name in f.keys())
            where.update((name, file) for name in f.keys())
    unexpected = [name for name, (param, _) in targets.items()
                  if param not in params and not name.endswith(skipped) and name not in tied]
    if unexpected:
        raise ValueError(f"checkpoint {path!r} has {len(unexpected)} tensor(s) the model does not have: "
                         f"{_some(unexpected)} ({CONFIG_HINT})")
    provided = defaultdict(set)
    for param, shard_id in targets.values():
        provided[param].add(shard_id)
    missing = [tensor for name in params
               for tensor in _checkpoint_names(name, _parts(name, packed) - provided[name], packed)]
    if missing:
        raise ValueError(f"checkpoint {path!r} is missing tensor(s): {_some(missing)}")
    for name, source in tied.items():
        if name in where and source in where and not torch.equal(_read(where[name], name),
                                                                 _read(where[source], source)):
            raise ValueError(f"checkpoint {path!r}: config.json ties {name} to {source} (tie_word_embeddings), "
                             f"but the checkpoint's {name} differs from {source}; if both are meant, set "
                             f"tie_word_embeddings to false in config.json")
    for file in files:
        with _open(file) as f:
            for name in f.keys():
                param_name, shard_id = targets[name]
                if param_name in params:
                    _load(params[param_name], f.get_tensor(name), shard_id, f"{name} in {file}")


def checkpoint_files(path: str) -> list[str]:
    """The weight files, chosen as transformers chooses them: model.safetensors if there is one, else the shards
    that model.safetensors.index.json names, else every *.safetensors. A stray file beside them (an older
    conversion, a shard of another run) is not read: its tensors would silently replace the real ones."""
    single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(single):
        return [single]
    if os.path.exists(index):
        try:
            with open(index) as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise ValueError(f"cannot read {index}: {e!r}") from None
        files = [os.path.join(path, name) for name in names]
        absent = [name for name, file in zip(names, files) if not os.path.exists(file)]
        if absent:
            raise ValueError(f"{index} names shard(s) that are not there: {_some(absent)}")
        return files
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors files in {path!r}")
    return files


def _read(file: str, name: str) -> torch.Tensor:
    with _open(file) as f:
        return f.get_tensor(name)


def _load(param: nn.Parameter, tensor: torch.Tensor, shard_id, what: str):
    weight_loader = getattr(param, "weight_loader", default_weight_loader)
    try:
        weight_loader(param, tensor) if shard_id is None else weight_loader(param, tensor, shard_id)
    except ValueError as e:
        raise ValueError(f"{what}: {e} ({CONFIG_HINT})") from None


@contextlib.contextmanager
def _open(file: str):
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            yield f
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read {file}: {e} (truncated or corrupt?)") from None


def _target(name: str, packed: dict) -> tuple[str, object]:
    """The parameter that checkpoint tensor `name` goes to, and which part of it (None: all of it)."""
    for part, (fused, shard_id) in packed.items():
        if f".{part}." in name:
            return name.replace(f".{part}.", f".{fused}."), shard_id
    return name, None


def _parts(param_name: str, packed: dict) -> set:
    """The shard ids a parameter must receive: each part of a fused one, else just None."""
    module = param_name.split(".")[-2] if "." in param_name else ""
    return {shard_id for fused, shard_id in packed.values() if fused == module} or {None}


def _checkpoint_names(param_name: str, shard_ids: set, packed: dict) -> list[str]:
    """The checkpoint tensors that hold these parts of a parameter: for a fused one, its parts' names."""
    if shard_ids == {None}:
        return [param_name]
    return [param_name.replace(f".{fused}.", f".{part}.") for part, (fused, shard_id) in packed.items()
            if shard_id in shard_ids and f".{fused}." in param_name]


def _some(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")

import glob
import os
from collections import Counter

import torch
from safetensors import safe_open
from torch import nn

from nanovllm.layers.linear import MergedLinear


@torch.no_grad()
def load_model(model: nn.Module, path: str):
    """Copy every tensor of the checkpoint's *.safetensors into `model`, reading straight to its device.

    Fused projections (q/k/v, gate/up) take their parts by row range. A parameter (or part) that the
    checkpoint does not provide is an error.
    """
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors files in {path!r}")
    params = dict(model.named_parameters())
    merged = {name: module for name, module in model.named_modules() if isinstance(module, MergedLinear)}
    # "layers.0.self_attn.k_proj" -> ("layers.0.self_attn.qkv_proj", rows of k in it)
    shards = {f"{name.rpartition('.')[0]}.{shard}": (name, module.shard_rows(shard))
              for name, module in merged.items() for shard in module.shard_sizes}
    device = next(model.parameters()).device
    parts_loaded = Counter()
    for file in files:
        with safe_open(file, framework="pt", device=str(device)) as f:
            for name in f.keys():
                target = _target(name, params, shards)
                if target is None:
                    continue  # e.g. a tied lm_head saved anyway
                param_name, rows = target
                destination = params[param_name].data
                if rows is not None:
                    destination = destination.narrow(0, *rows)
                weight = f.get_tensor(name)
                if destination.shape != weight.shape:
                    raise ValueError(f"{name}: checkpoint shape {tuple(weight.shape)} does not match the "
                                     f"model's {tuple(destination.shape)} (does config.json match the weights?)")
                destination.copy_(weight)
                parts_loaded[param_name] += 1
    missing = [name for name in params if parts_loaded[name] < _num_parts(name, merged)]
    if missing:
        raise ValueError(f"checkpoint {path!r} is missing weights for: {', '.join(missing)}")


def _num_parts(param_name: str, merged: dict) -> int:
    module = merged.get(param_name.rpartition(".")[0])
    return len(module.shard_sizes) if module is not None else 1


def _target(name: str, params: dict, shards: dict) -> tuple[str, tuple[int, int] | None] | None:
    """The parameter (and row range, for a fused one) that checkpoint tensor `name` goes to."""
    if name in params:
        return name, None
    module_path, _, suffix = name.rpartition(".")
    if module_path in shards:
        merged_name, rows = shards[module_path]
        return f"{merged_name}.{suffix}", rows
    return None

import torch
from torch import nn


class MergedLinear(nn.Linear):
    """Several projections of one input fused into one matmul (q/k/v, gate/up).

    `shard_names` lists the checkpoint names of the parts in output order; the loader copies each part
    into its rows.
    """

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool = False):
        super().__init__(in_features, sum(shard_sizes.values()), bias=bias)
        self.shard_sizes = shard_sizes

    def shard_rows(self, name: str) -> tuple[int, int]:
        offset = 0
        for shard, size in self.shard_sizes.items():
            if shard == name:
                return offset, size
            offset += size
        raise KeyError(name)

    def split(self, out: torch.Tensor) -> list[torch.Tensor]:
        return list(out.split(list(self.shard_sizes.values()), dim=-1))

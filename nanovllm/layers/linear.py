"""Linear layers split across tensor-parallel ranks (Megatron-style), and the group the ranks share.

A column-parallel layer splits the output features: each rank computes its slice of y, no communication.
A row-parallel layer splits the input features: each rank computes a partial y from its slice of x, and an
all-reduce sums them. Attention (q/k/v, column) -> o_proj (row), and MLP gate/up (column) -> down (row),
so each layer costs two all-reduces. At world size 1 every layer is one F.linear, as without parallelism.

Each parameter has a `weight_loader(param, checkpoint_tensor[, shard_id])` that copies its own shard out of
the whole checkpoint tensor, so the loader needs to know nothing about layers or ranks.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class TensorParallelGroup:
    """This rank's place among the ranks that share one model, and the collectives between them.

    The default, rank 0 of 1, is a model on one device: every collective is a no-op.
    """

    def __init__(self, rank: int = 0, size: int = 1, device: torch.device | None = None, backend=None):
        self.rank, self.size, self.device, self.backend = rank, size, device, backend

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place."""
        if self.size > 1:
            self.backend.allreduce([x]).wait()
        return x

    def gather(self, x: torch.Tensor) -> torch.Tensor | None:
        """Rank 0 gets every rank's `x` concatenated along the last dim; the others get None."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else []
        self.backend.gather([parts] if parts else [], [x.contiguous()], dist.GatherOptions()).wait()
        return torch.cat(parts, dim=-1) if parts else None

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's `x` on every rank, in place."""
        if self.size > 1:
            self.backend.broadcast([x], dist.BroadcastOptions()).wait()
        return x

    def min(self, value: int) -> int:
        """The smallest of every rank's `value`."""
        if self.size == 1:
            return value
        t = torch.tensor([value], device=self.device)
        options = dist.AllreduceOptions()
        options.reduceOp = dist.ReduceOp.MIN
        self.backend.allreduce([t], options).wait()
        return int(t.item())


SINGLE = TensorParallelGroup()


def copy_shard(param: torch.Tensor, loaded: torch.Tensor, dim: int = 0, start: int = 0, full_size: int | None = None):
    """Copy `loaded`'s slice [start, start + param.size(dim)) along `dim` into `param`.

    `full_size` is how long `loaded` must be along `dim` (default: as long as `param`): a checkpoint made
    for another config fails here, naming both shapes.
    """
    expected = list(param.shape)
    if full_size is not None:
        expected[dim] = full_size
    if list(loaded.shape) != expected:
        raise ValueError(f"checkpoint shape {tuple(loaded.shape)} does not match the model's {tuple(expected)}")
    param.copy_(loaded.narrow(dim, start, param.size(dim)))


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor):
    """For parameters every rank holds whole (norms, row-parallel biases)."""
    copy_shard(param.data, loaded)


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b, W split by rows (output features): each rank computes its slice of y."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp: TensorParallelGroup = SINGLE):
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(out_features // tp.size, in_features))
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features // tp.size))
            self.bias.weight_loader = self.weight_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor):
        rows = param.size(0)
        copy_shard(param.data, loaded, 0, self.tp.rank * rows, rows * self.tp.size)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input in one matmul (gate/up): each rank holds its slice
    of every part, in part order. Checkpoint part i loads with shard_id i."""

    def __init__(self, in_features: int, part_sizes: list[int], bias: bool = False,
                 tp: TensorParallelGroup = SINGLE):
        super().__init__(in_features, sum(part_sizes), bias, tp)
        self.part_sizes = part_sizes

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int):
        local = [size // self.tp.size for size in self.part_sizes]
        rows = param.data.narrow(0, sum(local[:shard_id]), local[shard_id])
        copy_shard(rows, loaded, 0, self.tp.rank * local[shard_id], self.part_sizes[shard_id])


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v in one matmul, split by heads. With more ranks than KV heads, each KV head is replicated
    on the ranks whose query heads use it. Checkpoint parts load with shard_id "q", "k", "v"."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False,
                 tp: TensorParallelGroup = SINGLE):
        heads, kv_heads = num_heads // tp.size, max(1, num_kv_heads // tp.size)  # this rank's
        super().__init__(hidden_size, (heads + 2 * kv_heads) * head_dim * tp.size, bias, tp)
        self.num_heads, self.num_kv_heads, self.head_dim, self.total_kv_heads = heads, kv_heads, head_dim, num_kv_heads

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str):
        q, kv, d = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.head_dim
        kv_start = self.tp.rank * self.total_kv_heads // self.tp.size * d
        offset, size, start, full = {"q": (0, q, self.tp.rank * q, q * self.tp.size),
                                     "k": (q, kv, kv_start, self.total_kv_heads * d),
                                     "v": (q + kv, kv, kv_start, self.total_kv_heads * d)}[shard_id]
        copy_shard(param.data.narrow(0, offset, size), loaded, 0, start, full)

    def split(self, qkv: torch.Tensor) -> list[torch.Tensor]:
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return list(qkv.split([q, kv, kv], dim=-1))


class RowParallelLinear(nn.Module):
    """y = x W^T + b, W split by columns (input features): partial sums, all-reduced. The bias is added once."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp: TensorParallelGroup = SINGLE):
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(out_features, in_features // tp.size))
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features))
            self.bias.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(F.linear(x, self.weight, self.bias if self.tp.rank == 0 else None))

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor):
        columns = param.size(1)
        copy_shard(param.data, loaded, 1, self.tp.rank * columns, columns * self.tp.size)

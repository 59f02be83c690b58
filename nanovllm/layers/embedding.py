import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.layers.linear import SINGLE, TensorParallelGroup, copy_shard


class VocabParallelEmbedding(nn.Module):
    """The token embedding, split by vocabulary rows across ranks; also the LM head, which has the same
    weight layout (and is the same module when the embeddings are tied).

    Each rank embeds the tokens in its rows and zeros the others; an all-reduce sums the ranks, which is
    exact (one term is nonzero). For the logits each rank computes its vocabulary slice and rank 0 gathers
    them. The vocabulary must split evenly (Config checks).
    """

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallelGroup = SINGLE):
        super().__init__()
        self.tp = tp
        self.rows = vocab_size // tp.size
        self.first_row = tp.rank * self.rows
        self.weight = nn.Parameter(torch.empty(self.rows, hidden_size))
        self.weight.weight_loader = self.weight_loader

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local_ids = input_ids - self.first_row
        mine = (local_ids >= 0) & (local_ids < self.rows)
        h = F.embedding(local_ids.masked_fill(~mine, 0), self.weight)
        return self.tp.all_reduce(h.masked_fill(~mine.unsqueeze(-1), 0))

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """Logits over the whole vocabulary on rank 0; None on the other ranks."""
        return self.tp.gather(F.linear(hidden_states, self.weight))

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor):
        copy_shard(param.data, loaded, 0, self.first_row, self.rows * self.tp.size)

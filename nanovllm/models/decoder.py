"""The decoder-only transformer shared by Qwen3, Qwen2 and Llama-family checkpoints.

They differ only in two switches: Qwen3 RMS-normalizes each head's q and k before the rotary embedding,
and Qwen2 (or a Llama with attention_bias) adds biases to the q/k/v projections. Parameter names follow
the Hugging Face checkpoints, except that q/k/v and gate/up are fused into one matmul each
(`packed_modules_mapping` tells the loader which checkpoint tensors go where).

With tensor parallelism (`tp`, see layers/linear.py) each rank holds its share of the heads, of the MLP's
intermediate features and of the vocabulary; everything else is replicated.
"""
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from nanovllm.layers.attention import Attention
from nanovllm.layers.embedding import VocabParallelEmbedding
from nanovllm.layers.linear import (SINGLE, MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear,
                                    TensorParallelGroup)
from nanovllm.layers.norm import RMSNorm, rms_norm
from nanovllm.layers.rotary import RotaryEmbedding, apply_rotary
from nanovllm.utils.context import Context


class DecoderAttention(nn.Module):

    def __init__(self, config: PretrainedConfig, tp: TensorParallelGroup):
        super().__init__()
        num_heads = config.num_attention_heads
        num_kv_heads = kv_heads_of(config)
        self.head_dim = head_dim_of(config)
        bias = getattr(config, "attention_bias", False) or config.model_type == "qwen2"
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, num_heads, num_kv_heads, bias, tp)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads  # this rank's
        self.o_proj = RowParallelLinear(num_heads * self.head_dim, config.hidden_size,
                                        getattr(config, "attention_bias", False) and config.model_type != "qwen2", tp)
        self.qk_norm = config.model_type == "qwen3"
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim ** -0.5)

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, ctx: Context) -> torch.Tensor:
        # On CUDA, the kernel that rotates q and k also writes k and v into the cache: one launch, not three.
        store = x.is_cuda and self.attn.k_cache.numel() > 0  # no cache during the memory-sizing warm-up
        o = self.attn(*self.project(rope, x, ctx if store else None), ctx, kv_stored=store)
        return self.o_proj(o.flatten(1, -1))

    def project(self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, store_ctx: Context | None = None):
        """q, k, v of the new tokens, q and k normalized (Qwen3) and rotated; given `store_ctx` (CUDA), k and v are
        also written into this layer's cache at its slot mapping."""
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q_weight, k_weight = (self.q_norm.weight, self.k_norm.weight) if self.qk_norm else (None, None)
        eps = self.q_norm.eps if self.qk_norm else 0.0
        if store_ctx is not None:
            from nanovllm.layers import kernels  # imported late: tests set TRITON_INTERPRET first
            q, k = kernels.rotate_qk(q, k, q_weight, k_weight, eps, *rope, v, self.attn.k_cache, self.attn.v_cache,
                                     store_ctx.slot_mapping)
            return q, k, v
        q, k = norm_and_rotate(q, k, q_weight, k_weight, eps, *rope)
        return q, k, v


class MLP(nn.Module):

    def __init__(self, config: PretrainedConfig, tp: TensorParallelGroup):
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        size = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [size, size], bias, tp)
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


def norm_and_rotate(q, k, q_weight, k_weight, eps: float, cos, sin):
    """Qwen3's per-head q/k RMSNorm (when the weights are given) and the rotary embedding; on CUDA one Triton
    launch for both (without storing the KV: the memory-sizing warm-up, which has no cache yet)."""
    if q.is_cuda:
        from nanovllm.layers import kernels  # imported late: tests set TRITON_INTERPRET first
        return kernels.rotate_qk(q, k, q_weight, k_weight, eps, cos, sin)
    if q_weight is not None:
        q, k = rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps)
    return apply_rotary(q, k, cos, sin)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    if gate_up.is_cuda:
        from nanovllm.layers import kernels
        return kernels.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class DecoderLayer(nn.Module):

    def __init__(self, config: PretrainedConfig, tp: TensorParallelGroup):
        super().__init__()
        self.self_attn = DecoderAttention(config, tp)
        self.mlp = MLP(config, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, rope, h: torch.Tensor, residual: torch.Tensor | None, ctx: Context):
        """Returns (this layer's output, the residual stream before it); their sum is the HF hidden state."""
        if residual is None:
            x, residual = self.input_layernorm(h), h
        else:
            x, residual = self.input_layernorm(h, residual)
        h = self.self_attn(rope, x, ctx)
        x, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(x), residual


class DecoderModel(nn.Module):

    def __init__(self, config: PretrainedConfig, tp: TensorParallelGroup):
        super().__init__()
        self.rotary = RotaryEmbedding(head_dim_of(config), config.max_position_embeddings, rope_parameters(config))
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList([DecoderLayer(config, tp) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: Context) -> torch.Tensor:
        h, residual = self.embed_tokens(input_ids), None
        rope = self.rotary(positions)
        for layer in self.layers:
            h, residual = layer(rope, h, residual, ctx)
        return self.norm(h, residual)[0]

    def forward_interleaved(self, nanos: list[tuple[torch.Tensor, torch.Tensor, Context]], lanes) -> torch.Tensor:
        """forward() of a decode batch cut into nano-batches, issued so that the attention of one can run beside
        the dense layers (projections, MLP) of another: M2's attention/FFN pipeline (engine/partitions.py).

        Each nano-batch alternates between `with lanes.dense(i):` and `with lanes.attention(i):` pieces, which
        put the work on the dense or the attention partition after the nano-batch's previous piece; per layer,
        every attention piece is issued before the dense pieces that follow it, so while nano-batch 1 is in
        attention, nano-batch 0 is already in its MLP. Each row meets the same modules as in forward(), in the
        same order. Returns the nano-batches' hidden states, concatenated in order, once `lanes` has joined.
        """
        crossing = []  # tensors made on one lane and read on the other: alive until the lanes join
        states = []  # per nano-batch: [rope, residual, (q, k, v)]
        for i, (input_ids, positions, _) in enumerate(nanos):
            with lanes.dense(i):
                h = self.embed_tokens(input_ids)
                rope = self.rotary(positions)
                qkv = self.layers[0].self_attn.project(rope, self.layers[0].input_layernorm(h))
            states.append([rope, h, qkv])
            crossing.append(qkv)
        outputs = []
        for n, layer in enumerate(self.layers):
            attended = []
            for i, (_, _, ctx) in enumerate(nanos):
                with lanes.attention(i):
                    attended.append(layer.self_attn.attn(*states[i][2], ctx))
            crossing.extend(attended)
            following = self.layers[n + 1] if n + 1 < len(self.layers) else None
            for i, o in enumerate(attended):
                rope, residual, _ = states[i]
                with lanes.dense(i):
                    h = layer.self_attn.o_proj(o.flatten(1, -1))
                    x, residual = layer.post_attention_layernorm(h, residual)
                    h = layer.mlp(x)
                    if following is None:
                        outputs.append(self.norm(h, residual)[0])
                        continue
                    x, residual = following.input_layernorm(h, residual)
                    states[i] = [rope, residual, following.self_attn.project(rope, x)]
                crossing.append(states[i][2])
        lanes.join()
        return torch.cat(outputs)


class DecoderForCausalLM(nn.Module):
    # checkpoint name -> (the fused parameter's module name, which part of it)
    packed_modules_mapping = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
                              "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, config: PretrainedConfig, tp: TensorParallelGroup = SINGLE):
        super().__init__()
        self.model = DecoderModel(config, tp)
        tied = getattr(config, "tie_word_embeddings", False)
        self.lm_head = self.model.embed_tokens if tied else VocabParallelEmbedding(config.vocab_size,
                                                                                   config.hidden_size, tp)
        # Checkpoint tensors the loader may skip: rotary tables some checkpoints carry.
        self.skipped_checkpoint_tensors = ("rotary_emb.inv_freq",)
        # Tied: the copy of the embeddings that some checkpoints save as lm_head (it must be a copy).
        self.tied_checkpoint_tensors = {"lm_head.weight": "model.embed_tokens.weight"} if tied else {}

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: Context) -> torch.Tensor:
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """Logits over the whole vocabulary on rank 0; None on the other tensor-parallel ranks."""
        return self.lm_head.logits(hidden_states)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]


def kv_heads_of(config: PretrainedConfig) -> int:
    """KV heads: config.json's num_key_value_heads where it gives one, else one per attention head (no GQA)."""
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def head_dim_of(config: PretrainedConfig) -> int:
    """Per-head size: config.json's head_dim where it gives one (it need not be hidden_size / heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_parameters(config: PretrainedConfig) -> dict:
    """transformers >= 5 keeps rope settings in `rope_parameters`; older configs in rope_theta/rope_scaling."""
    params = getattr(config, "rope_parameters", None)
    if params:
        return dict(params)
    params = dict(getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_type", params.pop("type", "default"))
    params["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    return params

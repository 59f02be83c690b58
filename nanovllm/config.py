import json
import os
from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, PretrainedConfig

# Checkpoint architectures that models/decoder.py implements.
SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM")
REQUIRED_CONFIG_FIELDS = ("architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
                          "num_attention_heads", "vocab_size", "rms_norm_eps")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class Config:
    """Everything the engine needs to know, checked before any weights load."""
    model: str
    max_num_batched_tokens: int = 16384
    max_num_seqs: int = 512
    max_model_len: int = 4096
    gpu_memory_utilization: float = 0.9
    kv_cache_block_size: int = 256
    num_kv_cache_blocks: int = -1  # > 0: use exactly this many blocks (decode side in PD mode); needed on CPU
    num_prefill_kv_cache_blocks: int = -1  # PD mode only: prefill-side blocks; default as above
    enforce_eager: bool = False
    tensor_parallel_size: int = 1  # > 1: one process per rank, rank r on GPU device+r (all on the CPU: gloo)
    device: str | None = None  # "cuda", "cuda:N" or "cpu"; default cuda when available
    dtype: str | torch.dtype | None = None  # default bfloat16 on CUDA, float32 on CPU
    enable_two_gpu_pd: bool = False
    prefill_device_id: int | str = 0
    decode_device_id: int | str = 1
    hf_config: PretrainedConfig | None = field(default=None, repr=False)
    eos: int = -1

    def __post_init__(self):
        self._check_limits()
        self._resolve_devices()
        self.hf_config = load_hf_config(self.model)
        self._check_tensor_parallel_split()
        self.max_model_len = min(self.max_model_len, self.hf_config.max_position_embeddings)
        if self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_model_len "
                             f"({self.max_model_len}): a prompt is prefilled in one step")
        self.dtype = self._resolve_dtype()

    def _check_limits(self):
        for name in ("max_num_batched_tokens", "max_num_seqs", "max_model_len", "kv_cache_block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        block_size = self.kv_cache_block_size
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"kv_cache_block_size must be a power of two >= 16, got {block_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        tp = self.tensor_parallel_size
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
            raise ValueError(f"tensor_parallel_size must be a positive int, got {tp!r}")
        if tp > 1 and self.enable_two_gpu_pd:
            raise ValueError("tensor_parallel_size > 1 cannot be combined with enable_two_gpu_pd")
        if not os.path.isdir(self.model):
            raise ValueError(f"model directory not found: {self.model!r}")

    def _resolve_devices(self):
        if not self.enable_two_gpu_pd:
            device = resolve_device(self.device)
            tp, count = self.tensor_parallel_size, torch.cuda.device_count()
            if device.type == "cuda" and device.index + tp > count:
                raise ValueError(f"tensor_parallel_size={tp} needs GPUs {device} to cuda:{device.index + tp - 1}; "
                                 f"this machine has {count} CUDA device(s)")
            self.device = str(device)
            return
        prefill, decode = resolve_device(self.prefill_device_id), resolve_device(self.decode_device_id)
        if prefill.type != decode.type:
            raise ValueError(f"prefill and decode devices must be of one type, got {prefill} and {decode}")
        if prefill.type == "cuda" and prefill == decode:
            raise ValueError(f"enable_two_gpu_pd needs two different GPUs, got {prefill} twice")
        self.prefill_device_id, self.decode_device_id = str(prefill), str(decode)
        self.device = str(decode)

    def _check_tensor_parallel_split(self):
        """Each rank takes an equal share of the heads, the MLP and the vocabulary. KV heads may also be
        fewer than the ranks, if the ranks split evenly among them (each KV head is then replicated)."""
        tp, hf = self.tensor_parallel_size, self.hf_config
        if tp == 1:
            return
        kv_heads = getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
        for name, value in (("num_attention_heads", hf.num_attention_heads), ("intermediate_size", hf.intermediate_size),
                            ("vocab_size", hf.vocab_size)):
            if value % tp:
                raise ValueError(f"tensor_parallel_size={tp} must divide the model's {name} ({value})")
        if kv_heads % tp and tp % kv_heads:
            raise ValueError(f"tensor_parallel_size={tp} and the model's num_key_value_heads ({kv_heads}) must "
                             f"divide one another")

    def _resolve_dtype(self) -> torch.dtype:
        if self.dtype is None:
            return torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        if isinstance(self.dtype, torch.dtype) and self.dtype in DTYPES.values():
            return self.dtype
        if self.dtype in DTYPES:
            return DTYPES[self.dtype]
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")


def resolve_device(spec: int | str | torch.device | None) -> torch.device:
    """An int is a GPU index; a string is a torch device. Raises ValueError for GPUs that are not there."""
    if spec is None:
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(spec, bool) or not isinstance(spec, (int, str, torch.device)):
        raise ValueError(f"a device must be a GPU index or a device string, got {spec!r}")
    try:
        device = torch.device("cuda", spec) if isinstance(spec, int) else torch.device(spec)
    except RuntimeError as e:
        raise ValueError(f"invalid device {spec!r}: {e}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise ValueError(f"device must be cuda or cpu, got {device}")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if device.index is None and count else device.index
    if index is None or not 0 <= index < count:
        raise ValueError(f"GPU {spec!r} does not exist: this machine has {count} CUDA device(s)")
    return torch.device("cuda", index)


def load_hf_config(model_dir: str) -> PretrainedConfig:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{model_dir!r} has no config.json: expected a Hugging Face-format checkpoint directory")
    with open(path) as f:
        raw = json.load(f)
    missing = [name for name in REQUIRED_CONFIG_FIELDS if name not in raw]
    if missing:
        raise ValueError(f"{path} is missing required field(s): {', '.join(missing)}")
    architecture = (raw["architectures"] or [None])[0]
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported architecture {architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    hf_config = AutoConfig.from_pretrained(model_dir)
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {hf_config.hidden_act!r}; only silu is supported")
    return hf_config

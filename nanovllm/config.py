import json
import logging
import os
from dataclasses import dataclass, field, fields
from typing import get_args

import torch
from transformers import AutoConfig, PretrainedConfig

from nanovllm.engine.partitions import check_sm_partitions
from nanovllm.models.decoder import kv_heads_of

# Checkpoint architectures that models/decoder.py implements.
SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM")
REQUIRED_CONFIG_FIELDS = ("architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
                          "num_attention_heads", "vocab_size", "rms_norm_eps")
logger = logging.getLogger("nanovllm")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
MAX_NUM_SEQS = 65535  # CUDA limits a grid's second and third axes to this


@dataclass
class Config:
    """Everything the engine needs to know, checked before any weights load."""
    model: str
    max_num_batched_tokens: int = 16384
    max_num_seqs: int = 512
    max_model_len: int = 4096
    gpu_memory_utilization: float = 0.9
    kv_cache_block_size: int = 256
    num_kv_cache_blocks: int = -1  # > 0: exactly this many blocks (decode side in PD mode); -1: sized automatically
    num_prefill_kv_cache_blocks: int = -1  # PD mode only: prefill-side blocks; -1: as num_kv_cache_blocks
    enforce_eager: bool = False
    tensor_parallel_size: int = 1  # > 1: one process per rank, rank r on GPU device+r (all on the CPU: gloo)
    device: int | str | torch.device | None = None  # "cuda", "cuda:N", "cpu" or a GPU index; default cuda if any
    dtype: str | torch.dtype | None = None  # default bfloat16 on CUDA, float32 on CPU
    # a step's tokens (decodes + prompt chunks) while decodes run; 0: prefill steps run alone
    chunked_prefill_tokens: int = 8192
    enable_two_gpu_pd: bool = False
    prefill_device_id: int | str | torch.device = 0
    decode_device_id: int | str | torch.device = 1
    pd_policy: str = "adaptive"  # "adaptive": both GPUs decode, placement follows load; "static": M1's strict split
    pd_fallback: str = "error"  # PD impossible as asked: "error", "single" (one device), "host" (KV via host memory)
    # M2, CUDA green contexts (M2_SM_PARTITIONS.md): {"attention_sms": N} runs large decode batches as the
    # attention/FFN pipeline, attention on N SMs and the dense layers on the rest; {"decode_sms": [N, ...]} runs
    # a mixed step's decodes on N SMs (N chosen per step by load) beside its prompt chunk on the rest. None: off.
    sm_partitions: dict | None = None
    hf_config: PretrainedConfig | None = field(default=None, repr=False)
    eos_token_ids: tuple[int, ...] = field(default=(), init=False)  # filled in by the engine from the checkpoint
    kv_via_host: bool = field(default=False, init=False)  # PD without peer access: stage KV copies in host memory

    def __post_init__(self):
        if isinstance(self.model, os.PathLike):
            self.model = os.fspath(self.model)
        self._check_types()
        self.model = os.path.expanduser(self.model)  # "~/models/x", as a shell would read it
        self._check_limits()
        self._resolve_devices()
        self.hf_config = load_hf_config(self.model)
        self._check_tensor_parallel_split()
        self._fit_max_model_len()
        self._check_sliding_window()
        self._check_rope()
        self._check_head_dim()
        for name in ("num_kv_cache_blocks", "num_prefill_kv_cache_blocks"):  # given ones: before weights load
            if getattr(self, name) > 0:
                check_kv_pool(getattr(self, name), self.max_model_len, self.kv_cache_block_size, f"{name}: ")
        if not self.chunked_prefill_tokens and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_model_len "
                             f"({self.max_model_len}) when chunked_prefill_tokens is 0: a prompt is then "
                             f"prefilled in one step")
        self.dtype = self._resolve_dtype()
        if self.sm_partitions is not None:
            self.sm_partitions = check_sm_partitions(self)

    def _check_types(self):
        """Every field must be of its annotated type; a bool is not a number here, and an int is a float."""
        for f in fields(self):
            if not f.init or f.name == "hf_config":
                continue  # set by the engine, not by the user
            value, allowed = getattr(self, f.name), get_args(f.type) or (f.type,)
            if float in allowed:
                allowed += (int,)
            if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
                names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
                raise TypeError(f"{f.name} must be {names}, got {type(value).__name__} {value!r}")

    def _check_limits(self):
        for name in ("max_num_batched_tokens", "max_num_seqs", "max_model_len", "kv_cache_block_size"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("num_kv_cache_blocks", "num_prefill_kv_cache_blocks"):
            value = getattr(self, name)
            if value != -1 and value < 1:
                raise ValueError(f"{name} must be -1 (sized automatically) or a positive int, got {value!r}")
        if self.max_num_seqs > MAX_NUM_SEQS:
            raise ValueError(f"max_num_seqs must be <= {MAX_NUM_SEQS} (a decode step's sequences are one axis of the "
                             f"decode kernel's CUDA grid), got {self.max_num_seqs}")
        block_size = self.kv_cache_block_size
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"kv_cache_block_size must be a power of two >= 16, got {block_size}")
        if self.chunked_prefill_tokens < 0:  # its type was checked with every field's (_check_types)
            raise ValueError(f"chunked_prefill_tokens must be an int >= 0, got {self.chunked_prefill_tokens!r}")
        if self.pd_policy not in ("adaptive", "static"):
            raise ValueError(f"pd_policy must be 'adaptive' or 'static', got {self.pd_policy!r}")
        if self.pd_fallback not in ("error", "single", "host"):
            raise ValueError(f"pd_fallback must be 'error', 'single' or 'host', got {self.pd_fallback!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        tp = self.tensor_parallel_size
        if tp < 1:
            raise ValueError(f"tensor_parallel_size must be a positive int, got {tp!r}")
        if tp > 1 and self.enable_two_gpu_pd:
            raise ValueError("tensor_parallel_size > 1 cannot be combined with enable_two_gpu_pd")
        if not os.path.isdir(self.model):
            raise ValueError(f"model directory not found: {self.model!r}")

    def _resolve_devices(self):
        if self.enable_two_gpu_pd:
            try:
                self._resolve_pd_devices()
            except Unavailable as e:  # not a malformed value: that stays an error whatever the fallback
                if self.pd_fallback != "single":
                    raise
                logger.warning(f"PD mode is not possible here ({e}); pd_fallback='single': running on one device")
                self.enable_two_gpu_pd = False
                self.device = self.prefill_device_id if _exists(self.prefill_device_id) else None
        if not self.enable_two_gpu_pd:
            device = self._resolve_option("device")
            tp, count = self.tensor_parallel_size, torch.cuda.device_count()
            if device.type == "cuda" and device.index + tp > count:
                raise ValueError(f"tensor_parallel_size={tp} needs GPUs {device} to cuda:{device.index + tp - 1}; "
                                 f"this machine has {count} CUDA device(s)")
            self.device = str(device)

    def _resolve_option(self, name: str) -> torch.device:
        """The device that option `name` asks for; an error names the option (there are three)."""
        spec = getattr(self, name)
        try:
            return resolve_device(spec)
        except ValueError as e:
            raise type(e)(f"{name}={spec!r}: {e}") from None

    def _resolve_pd_devices(self):
        devices, unavailable = [], []
        for name in ("prefill_device_id", "decode_device_id"):  # a malformed value first, whatever the fallback
            try:
                devices.append(self._resolve_option(name))
            except Unavailable as e:
                unavailable.append(e)
        if unavailable:
            raise unavailable[0]
        prefill, decode = devices
        if prefill.type != decode.type:
            raise ValueError(f"prefill and decode devices must be of one type, got {prefill} and {decode}")
        if prefill.type == "cuda" and prefill == decode:
            raise ValueError(f"enable_two_gpu_pd needs two different GPUs, got {prefill} twice")
        if prefill.type == "cuda" and not torch.cuda.can_device_access_peer(prefill.index, decode.index):
            if self.pd_fallback != "host":
                raise Unavailable(f"{prefill} and {decode} have no peer access (no NVLink or P2P over PCIe), so KV "
                                 f"copies between them would crawl; pass pd_fallback='host' to copy through pinned "
                                 f"host memory, or 'single' to use one GPU")
            self.kv_via_host = True
        self.prefill_device_id, self.decode_device_id = str(prefill), str(decode)
        self.device = str(decode)

    def _check_tensor_parallel_split(self):
        """Each rank takes an equal share of the heads, the MLP and the vocabulary. KV heads may also be
        fewer than the ranks, if the ranks split evenly among them (each KV head is then replicated)."""
        tp, hf = self.tensor_parallel_size, self.hf_config
        if tp == 1:
            return
        kv_heads = kv_heads_of(hf)
        for name, value in (("num_attention_heads", hf.num_attention_heads),
                            ("intermediate_size", hf.intermediate_size),
                            ("vocab_size", hf.vocab_size)):
            if value % tp:
                raise ValueError(f"tensor_parallel_size={tp} must divide the model's {name} ({value})")
        if kv_heads % tp and tp % kv_heads:
            raise ValueError(f"tensor_parallel_size={tp} and the model's num_key_value_heads ({kv_heads}) must "
                             f"divide one another")

    def _fit_max_model_len(self):
        """The model was trained up to max_position_embeddings: cap max_model_len there. Said aloud when the user
        asked for more (the default, 4096, is capped quietly for models trained on less)."""
        positions = self.hf_config.max_position_embeddings
        if self.max_model_len > positions:
            asked = self.max_model_len != Config.max_model_len
            (logger.warning if asked else logger.info)(
                f"max_model_len={self.max_model_len} is more than the model's max_position_embeddings ({positions}) "
                f"in config.json: using max_model_len={positions}")
            self.max_model_len = positions

    def _check_sliding_window(self):
        """Every layer here attends over the whole sequence. A sliding-window layer (Qwen2/Qwen3 with
        use_sliding_window) attends only to its last `sliding_window` tokens: the same while sequences fit in the
        window, something else beyond it, so max_model_len must fit."""
        hf = self.hf_config
        window = getattr(hf, "sliding_window", None)  # None when use_sliding_window is off
        sliding = [i for i, kind in enumerate(getattr(hf, "layer_types", None) or []) if kind == "sliding_attention"]
        if sliding and window is not None and self.max_model_len > window:
            raise ValueError(f"{self.model}: sliding-window attention (use_sliding_window, sliding_window={window}) "
                             f"in layer(s) {', '.join(map(str, sliding))} is not implemented here, and gives the "
                             f"same result only while a sequence fits in the window: pass max_model_len <= {window} "
                             f"(now {self.max_model_len})")

    def _check_rope(self):
        """Rotary scaling other than Llama 3's would give other tokens than transformers: refuse it up front."""
        from nanovllm.layers.rotary import SUPPORTED_ROPE_TYPES
        from nanovllm.models.decoder import rope_parameters
        params = rope_parameters(self.hf_config)
        rope_type = params.get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"{self.model}: config.json asks for rotary scaling rope_type={rope_type!r} (rope_scaling "
                             f"or rope_parameters), which is not implemented here; supported: "
                             f"{', '.join(SUPPORTED_ROPE_TYPES)}")
        partial = params.get("partial_rotary_factor", getattr(self.hf_config, "partial_rotary_factor", None))
        if partial not in (None, 1, 1.0):
            raise ValueError(f"{self.model}: config.json asks for partial_rotary_factor={partial} (rotary embedding on "
                             f"part of each head), which is not implemented here")

    def _check_head_dim(self):
        """On CUDA the KV-cache, decode-attention and rotary kernels (Triton) take a head as one power-of-two block;
        other sizes (say 80 or 100) would fail inside a kernel at warm-up, after the weights load."""
        from nanovllm.models.decoder import head_dim_of
        head_dim = head_dim_of(self.hf_config)
        if self.device.startswith("cuda") and head_dim & (head_dim - 1):
            raise ValueError(f"{self.model}: head_dim={head_dim} (config.json) is not a power of two, which this "
                             f"engine's CUDA kernels need; it runs on the CPU (device='cpu')")

    def _resolve_dtype(self) -> torch.dtype:
        if self.dtype is None:
            return torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        if isinstance(self.dtype, torch.dtype) and self.dtype in DTYPES.values():
            return self.dtype
        if self.dtype in DTYPES:
            return DTYPES[self.dtype]
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")


def admission_watermark(num_blocks: int) -> int:
    """Blocks that admission keeps free in a pool of `num_blocks`, so that running sequences can grow."""
    return max(1, num_blocks // 100)


def min_kv_blocks(max_model_len: int, block_size: int) -> int:
    """The smallest pool that check_kv_pool accepts (the watermark grows with the pool)."""
    sequence = -(-max_model_len // block_size)
    n = sequence + 1
    while n < sequence + admission_watermark(n):
        n += 1
    return n


def check_kv_pool(num_blocks: int, max_model_len: int, block_size: int, side: str = ""):
    """A KV pool must hold one sequence of max_model_len beside the admission watermark, or a long prompt could
    be accepted and never run."""
    need = -(-max_model_len // block_size) + admission_watermark(num_blocks)
    if num_blocks < need:
        raise ValueError(f"{side}KV cache has {num_blocks} blocks of {block_size} tokens, too few for one sequence "
                         f"of max_model_len={max_model_len} (needs {need}); lower max_model_len or give more blocks")


class Unavailable(ValueError):
    """A well-formed device setting that this machine cannot meet (a GPU that is not there, no peer access)."""


def _exists(spec) -> bool:
    try:
        resolve_device(spec)
        return True
    except ValueError:
        return False


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
        raise Unavailable(f"GPU {spec!r} does not exist: this machine has {count} CUDA device(s)")
    return torch.device("cuda", index)


def load_hf_config(model_dir: str) -> PretrainedConfig:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{model_dir!r} has no config.json: expected a Hugging Face-format checkpoint directory")
    with open(path) as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    missing = [name for name in REQUIRED_CONFIG_FIELDS if name not in raw]
    if missing:
        raise ValueError(f"{path} is missing required field(s): {', '.join(missing)}")
    architectures = raw["architectures"]
    if not isinstance(architectures, list) or not architectures:
        raise ValueError(f"{path}: architectures must be a non-empty list, got {architectures!r}")
    architecture = architectures[0]
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported architecture {architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    quantization = raw.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else None
        raise ValueError(f"{model_dir}: config.json has a quantization_config (quant_method={method!r}); quantized "
                         f"checkpoints are not supported here: use the model's unquantized (bf16/fp16/fp32) weights")
    hf_config = AutoConfig.from_pretrained(model_dir)
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {hf_config.hidden_act!r}; only silu is supported")
    return hf_config

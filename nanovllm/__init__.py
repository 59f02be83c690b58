from nanovllm.config import Config
from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.llm import LLM
from nanovllm.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "SamplingParams", "Config"]

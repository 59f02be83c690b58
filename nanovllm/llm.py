from nanovllm.engine.llm_engine import LLMEngine


class LLM(LLMEngine):
    """`LLM(model_dir, **config).generate(prompts, SamplingParams(...))`: see Config for the options."""

"""vLLM general plugin (entry point `vllm.general_plugins`): runs in every vLLM process, so it only
registers names; the model module is imported lazily by vLLM when a model folder asks for it."""


def register() -> None:
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from vllm_visual_ar.model_executors.llamagen_config import ARCHITECTURE, MODEL_TYPE, LlamaGenConfig

    AutoConfig.register(MODEL_TYPE, LlamaGenConfig, exist_ok=True)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "vllm_visual_ar.model_executors.llamagen:LlamaGenForClassToImage")

"""vLLM plugins of this package, all named `vllm_visual_ar`, so `VLLM_PLUGINS=vllm_visual_ar` turns on
everything (endpoint plugins load only when named there; general plugins load unless excluded).

- `register` (entry point `vllm.general_plugins`) runs in every vLLM process, so it only registers
  names: the config class, the model class (imported lazily by vLLM), and a config hook for the
  model's architecture. The hook runs while vLLM builds its config for a LlamaGen folder and puts in
  place what the plugin needs, so `vllm serve <folder>` (any family in `families.py`) needs no class paths: the plugin's scheduler
  and worker (unless the user named others), no tokenizer, eager mode, no async scheduling and no
  prefix caching (see `engine.py` for why each), and the V1 model runner.
- `vllm_visual_ar.serving:ImagesEndpoint` (entry point `vllm.endpoint_plugins`) adds
  `POST /v1/images/generations` to vLLM's OpenAI server.
"""
import os


def configure_vllm(vllm_config) -> None:
    """What an engine serving an image model folder needs, applied to a VllmConfig being built."""
    from vllm_visual_ar.engine import SCHEDULER_CLS, WORKER_CLS

    if vllm_config.scheduler_config.scheduler_cls is None:
        vllm_config.scheduler_config.scheduler_cls = SCHEDULER_CLS
    if vllm_config.parallel_config.worker_cls == "auto":
        vllm_config.parallel_config.worker_cls = WORKER_CLS
    from vllm_visual_ar.families import family_of

    # Class-conditional models have no tokenizer; text-to-image ones use vLLM's (unless told not to).
    if not family_of(vllm_config.model_config.hf_config).takes_text:
        vllm_config.model_config.skip_tokenizer_init = True
    vllm_config.model_config.enforce_eager = True
    vllm_config.scheduler_config.async_scheduling = False
    vllm_config.cache_config.enable_prefix_caching = False
    # Read later, when the engine process starts its worker (which inherits the environment).
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def register() -> None:
    from transformers import AutoConfig
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig

    from vllm_visual_ar.families import FAMILIES, load_object

    class VisualAREngineConfig(VerifyAndUpdateConfig):
        @staticmethod
        def verify_and_update_config(vllm_config) -> None:
            configure_vllm(vllm_config)

    for family in FAMILIES:
        AutoConfig.register(family.model_type, load_object(family.config_class), exist_ok=True)
        if family.architecture not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(family.architecture, family.model_class)
        MODELS_CONFIG_MAP.setdefault(family.architecture, VisualAREngineConfig)
    # Emu3's LM in transformers' layout, as a plain vLLM model (not a family: `convert emu3` writes
    # the release's flat layout); vLLM maps Emu3ForConditionalGeneration to its Transformers backend.
    if "Emu3GenForConditionalGeneration" not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model("Emu3GenForConditionalGeneration",
                                     "vllm_visual_ar.model_executors.emu3:Emu3ForCausalLM")

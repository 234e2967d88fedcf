"""vllm-visual-ar: visual autoregressive image generation on vLLM.

Kept import-light: vLLM imports this package in every process to run the plugin entry point."""

__all__ = ["ImageGenerator"]


def __getattr__(name):
    if name == "ImageGenerator":
        from vllm_visual_ar.generator import ImageGenerator

        return ImageGenerator
    raise AttributeError(name)

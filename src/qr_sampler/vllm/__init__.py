"""vLLM integration: the logits processor vLLM loads from the entry point."""

from qr_sampler.vllm.adapter import QRSamplerLogitsProcessor

__all__ = ["QRSamplerLogitsProcessor"]

"""Low-rank adapters (LoRA) on any model: PEFT's on-disk format, and training on a
frozen (quantised) base."""

from quantizers.lora.peft_format import (
    AdapterFormatError,
    LoraAdapter,
    LoraModule,
    read_adapter,
    write_adapter,
)

__all__ = ["AdapterFormatError", "LoraAdapter", "LoraModule", "read_adapter", "write_adapter"]

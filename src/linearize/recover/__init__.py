"""Recovery after conversion: LoRA with LM loss, self-distillation, and alignment stages."""

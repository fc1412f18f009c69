"""Drop-ins for other LoRA-MoE code: ``xlora`` (PEFT's X-LoRA)."""

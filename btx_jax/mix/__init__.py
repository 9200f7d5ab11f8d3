"""The mix step: experts composed into one MoE model (LoRA-MoE, FFN-MoE) and its routers' init."""

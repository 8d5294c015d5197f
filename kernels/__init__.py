"""Fused ops for collaboration: a torch reference and a Triton kernel each (imported lazily)."""

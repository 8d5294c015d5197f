"""Trainable collaboration heads (logit addition, latent fusion)."""

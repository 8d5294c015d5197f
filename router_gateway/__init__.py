"""Switchyard's HTTP edge: OpenAI-compatible API in front of a registry of experts."""

__version__ = "0.1.0"

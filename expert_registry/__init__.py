"""Expert specs, the Redis-backed store, upstream clients, health and the worker launcher."""

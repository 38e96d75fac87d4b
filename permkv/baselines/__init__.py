"""Peers permkv is measured against: kvpress presses, Hugging Face generate / prompt lookup / continuous batching."""

"""Peers permkv is measured against: kvpress presses (`kvpress`), Hugging Face generate / prompt lookup / continuous batching (`hf`)."""

"""Peers permkv is measured against: kvpress presses (`permkv.baselines.kvpress`)."""

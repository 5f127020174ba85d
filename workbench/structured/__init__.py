"""Structured compression: depth (layers), width (MLP channels, heads) and vocabulary pruning."""

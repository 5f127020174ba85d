"""Pruning methods: pure tensor functions that return masks or updated weights."""

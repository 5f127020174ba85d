"""Evaluation beyond perplexity: zero-shot tasks (lm-eval), in-context learning (DAIL), efficiency, reports."""

"""Structured outputs: each request's grammar masks the tokens its output may continue with (llguidance)."""

from actors.structured.grammar import Grammar, GrammarCompiler, fill_bitmasks, grammar_source, mask_logits

__all__ = ["Grammar", "GrammarCompiler", "fill_bitmasks", "grammar_source", "mask_logits"]

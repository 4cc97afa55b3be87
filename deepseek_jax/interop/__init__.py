"""Interoperability with HuggingFace transformers (configs now; weights follow)."""

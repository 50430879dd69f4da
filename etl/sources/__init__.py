"""Feeds: one module per kind of source, each emitting the canonical record shapes."""

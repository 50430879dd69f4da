"""Athena vocabulary: read a release (tab-separated files) and load it into the warehouse."""

from etl.vocab.athena import VocabularyError
from etl.vocab.loader import VocabularyLoadResult, load_vocabulary

__all__ = ["VocabularyError", "VocabularyLoadResult", "load_vocabulary"]

"""Source code -> OMOP concept mapping: local maps first, then the vocabulary."""

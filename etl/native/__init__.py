"""Optional compiled kernels (built by setup.py when a C compiler is available).

`_hmac.pseudonyms`: the pseudonyms of an Arrow string column's values, as
etl/pseudonym.py defines them. Code using it falls back to SQL when it is missing.
"""

"""The optional C extensions; everything else about the package is in pyproject.toml.

`etl.native._hmac` computes the pseudonyms (keyed HMAC-SHA256) of a column in one pass,
with the CPU's SHA extensions where it has them; `etl.native._lines` tells whether every
line of a delimited file is one record (etl/sources/delimited.py's lines_are_records),
in one pass with memchr. Both are optional: where no C compiler is available the install
goes on without them, etl/pseudonym.py computes the same digests with its DuckDB SQL
macro and delimited.py scans the lines with NumPy.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "etl.native._hmac",
            sources=["etl/native/_hmac.c"],
            extra_compile_args=["-O3"],
            optional=True,
        ),
        Extension(
            "etl.native._lines",
            sources=["etl/native/_lines.c"],
            extra_compile_args=["-O3"],
            optional=True,
        ),
    ]
)

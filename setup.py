"""The optional C extension; everything else about the package is in pyproject.toml.

`etl.native._hmac` computes the pseudonyms (keyed HMAC-SHA256) of a column in one pass,
with the CPU's SHA extensions where it has them. It is optional: where no C compiler is
available the install goes on without it, and etl/pseudonym.py computes the same digests
with its DuckDB SQL macro.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "etl.native._hmac",
            sources=["etl/native/_hmac.c"],
            extra_compile_args=["-O3"],
            optional=True,
        )
    ]
)

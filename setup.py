"""Build the Cython wire core.

FASTWS_ANNOTATE=1 writes Cython's HTML annotation next to the .pyx;
FASTWS_TRACE=1 builds with line tracing (for profilers; slow).
"""

import os
import sys

from Cython.Build import cythonize
from setuptools import Extension, setup

trace = os.environ.get("FASTWS_TRACE") == "1"
if sys.platform == "win32":
    compile_args = ["/O2"]
else:
    compile_args = ["-O3", "-fno-strict-aliasing"]

macros = [("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")] if trace else []
extensions = [
    Extension("fastws._frame", ["src/fastws/_frame.pyx"], extra_compile_args=compile_args, define_macros=macros),
]
# permessage-deflate through zlib's C API; where there are no zlib headers to build against
# (a plain Windows toolchain), fastws.deflate uses Python's zlib module instead.
if os.environ.get("FASTWS_NO_ZLIB") != "1" and sys.platform != "win32":
    extensions.append(Extension("fastws._zlib", ["src/fastws/_zlib.pyx"], libraries=["z"],
                                extra_compile_args=compile_args, define_macros=macros))
# The client hot path of `fastws bench` (Linux: epoll).
if sys.platform.startswith("linux"):
    extensions.append(Extension("fastws.bench._loadgen", ["src/fastws/bench/_loadgen.pyx"],
                                extra_compile_args=compile_args))

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        annotate=os.environ.get("FASTWS_ANNOTATE") == "1",
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
            "linetrace": trace,
            "embedsignature": True,
        },
    )
)

"""Build the Cython wire core.

FASTWS_ANNOTATE=1 writes Cython's HTML annotation next to the .pyx;
FASTWS_TRACE=1 builds with line tracing (for profilers; slow);
FASTWS_NO_ZLIB_NG=1 skips building zlib-ng (the shared compression streams then use the system zlib).
"""

import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

trace = os.environ.get("FASTWS_TRACE") == "1"
if sys.platform == "win32":
    compile_args = ["/O2"]
else:
    compile_args = ["-O3", "-fno-strict-aliasing"]

macros = [("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")] if trace else []
HERE = Path(__file__).resolve().parent


def build_zlib_ng():
    """zlib-ng (vendor/zlib-ng), built by its own cmake as a static library in zlib-compatible mode,
    every public symbol prefixed so that it never meets the system zlib, and with its half-size hash
    table (WITH_REDUCED_MEM): a shared stream clears it before every message, 64 KiB instead of 128
    (3.6 instead of 5.0 µs per ~400-byte message, the same ratios: bench/deflate_cost.py).  Returns
    (include dir, library), or None where cmake or a compiler is missing: fastws._zlibng is then left out."""
    cmake = shutil.which("cmake")
    if cmake is None:
        try:
            import cmake as cmake_package  # the PyPI cmake, from pyproject.toml's build requirements

            cmake = str(Path(cmake_package.CMAKE_BIN_DIR) / "cmake")
        except ImportError:
            print("fastws: no cmake, so no zlib-ng: shared compression streams use the system zlib", file=sys.stderr)
            return None
    source = HERE / "vendor" / "zlib-ng"
    options = ["-DCMAKE_BUILD_TYPE=Release", "-DZLIB_COMPAT=ON", "-DZLIB_SYMBOL_PREFIX=fastws_zng_",
               "-DBUILD_SHARED_LIBS=OFF", "-DBUILD_TESTING=OFF", "-DWITH_GZFILEOP=OFF", "-DWITH_REDUCED_MEM=ON",
               "-DCMAKE_POSITION_INDEPENDENT_CODE=ON"]
    if sys.platform == "darwin":  # cibuildwheel cross-builds x86_64 wheels on arm64: build what ARCHFLAGS asks for
        archs = re.findall(r"-arch\s+(\S+)", os.environ.get("ARCHFLAGS", ""))
        if archs:
            options.append(f"-DCMAKE_OSX_ARCHITECTURES={';'.join(archs)}")
    # a build directory per zlib-ng version and set of options: changing either builds afresh
    version = re.search(r'#define ZLIBNG_VERSION "([^"]+)"', (source / "zlib-ng.h.in").read_text()).group(1)
    tag = hashlib.sha1(" ".join([version, *options]).encode()).hexdigest()[:10]
    build = HERE / "build" / f"zlib-ng-{version}-{sysconfig.get_platform()}-{tag}"
    library = build / "libz.a"
    if not library.exists():
        configure = [cmake, "-S", str(source), "-B", str(build), *options]
        try:
            subprocess.run(configure, check=True, stdout=subprocess.DEVNULL)
            subprocess.run([cmake, "--build", str(build), "--config", "Release", "--target", "zlib-ng",
                            "-j", str(os.cpu_count() or 2)], check=True, stdout=subprocess.DEVNULL)
        except (OSError, subprocess.CalledProcessError) as exc:
            print(f"fastws: building zlib-ng failed ({exc}): shared compression streams use the system zlib",
                  file=sys.stderr)
            return None
    return str(build), str(library)


extensions = [
    Extension("fastws._frame", ["src/fastws/_frame.pyx"], extra_compile_args=compile_args, define_macros=macros),
    # what the wire core calls, in C, to compress and inflate (the zlib streams below subclass it)
    Extension("fastws._codec", ["src/fastws/_codec.pyx"], extra_compile_args=compile_args, define_macros=macros),
]
# permessage-deflate through zlib's C API; where there are no zlib headers to build against
# (a plain Windows toolchain), fastws.deflate uses Python's zlib module instead.
if os.environ.get("FASTWS_NO_ZLIB") != "1" and sys.platform != "win32":
    extensions.append(Extension("fastws._zlib", ["src/fastws/_zlib.pyx"], libraries=["z"],
                                extra_compile_args=compile_args, define_macros=macros))
    zlib_ng = None if os.environ.get("FASTWS_NO_ZLIB_NG") == "1" else build_zlib_ng()
    if zlib_ng is not None:
        include, library = zlib_ng
        # --exclude-libs: zlib-ng's internal symbols are not exported (elsewhere Python's RTLD_LOCAL
        # loading keeps them to this module)
        hide = ["-Wl,--exclude-libs,ALL"] if sys.platform.startswith("linux") else []
        extensions.append(Extension("fastws._zlibng", ["src/fastws/_zlibng.pyx"], include_dirs=[include],
                                    extra_objects=[library], extra_link_args=hide,
                                    extra_compile_args=compile_args, define_macros=macros))

# The client hot path of `fastws bench` (Linux: epoll; zlib checks the echo of a compressed message).
if sys.platform.startswith("linux") and os.environ.get("FASTWS_NO_ZLIB") != "1":
    extensions.append(Extension("fastws.bench._loadgen", ["src/fastws/bench/_loadgen.pyx"], libraries=["z"],
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

"""Build the reference client's Cython listener in place:

    cd bench/peers && python setup.py build_ext --inplace
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    name="fastws-bench-peers",
    ext_modules=cythonize(
        [Extension("picows_echo_client", ["picows_echo_client.pyx"], extra_compile_args=["-O3"])],
        language_level=3,
    ),
)

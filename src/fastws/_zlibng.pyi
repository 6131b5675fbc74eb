"""Type stub for fastws._zlibng: fastws._zlib's API, built against zlib-ng."""

from fastws._zlib import ZLIB_VERSION as ZLIB_VERSION
from fastws._zlib import Deflater as Deflater
from fastws._zlib import Inflater as Inflater
from fastws._zlib import shared_deflater as shared_deflater
from fastws._zlib import shared_inflater as shared_inflater

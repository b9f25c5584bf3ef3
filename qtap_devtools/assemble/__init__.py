"""Sans-IO reassembly: captured bytes of one connection in, HTTP exchanges out.

No I/O, no clock, no imports from the rest of the project; see ``http1.py``.
"""

from .http1 import ConnectionAssembler
from .model import HttpExchange, HttpRequest, HttpResponse, combined_headers

__all__ = ["ConnectionAssembler", "HttpExchange", "HttpRequest", "HttpResponse", "combined_headers"]

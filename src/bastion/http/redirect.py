"""`redirect_https`: the answer an http listener gives every request when it only points to https.

308 keeps the method and the body (a POST is sent again as a POST, unlike 301 and 302). The
location is built from the request's normalised host (the routing host: lower case, no
port, no trailing dot), the listener's https port (left out when it is 443) and the
normalised path with the raw query, so it names exactly what would have been routed.
"""

from __future__ import annotations

from bastion.errors import BadRequest
from bastion.http.model import Headers, Request, Response


def https_location(request: Request, port: int) -> str:
    """`https://HOST[:PORT]/path?query` for this request. BadRequest when it named no host."""
    host = request.host
    if not host:
        raise BadRequest("The request has no Host to redirect to https with.")
    if ":" in host:
        host = f"[{host}]"  # IPv6
    if port != 443:
        host = f"{host}:{port}"
    path = request.path if request.path.startswith("/") else "/"  # OPTIONS * -> /
    return f"https://{host}{path}?{request.query}" if request.query else f"https://{host}{path}"


def https_redirect(request: Request, port: int) -> Response:
    """The 308 response (no body) sending this request to https on `port`."""
    location = https_location(request, port).encode("latin-1")
    return Response(308, Headers([(b"location", location)]))

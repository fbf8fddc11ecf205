"""jobd's HTTP face (SPEC §10), the optional part ``pip install 'jobd[http]'``.

``router`` is what a FastAPI web server mounts behind its own login;
``jobd.http.gateway`` (the ``jobd-http`` command) serves it alone, checking JWTs. The
daemon and ``jobd.client`` never import this package, so plain ``pip install .`` needs
none of FastAPI, uvicorn or PyJWT.
"""

from __future__ import annotations

try:
    from jobd.http.api import Principal, error_body, router
except ModuleNotFoundError as e:  # the extra is not installed: say which, and how
    raise ModuleNotFoundError(f"jobd.http needs {e.name}, which is not installed: "
                              "pip install 'jobd[http]'", name=e.name) from None

__all__ = ["Principal", "error_body", "router"]

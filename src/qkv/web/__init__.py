"""The attention explorer: a local web page and JSON API over `qkv.explain` (`qkv serve`).

    from qkv.web.app import create_app     # the ASGI app (FastAPI on Starlette), testable without a socket
    from qkv.web.server import serve       # uvicorn on 127.0.0.1
    from qkv.web.schema import ...         # the requests, answers and errors (pydantic models)

Needs the `web` extra (fastapi, starlette, uvicorn): pip install 'qkv[web]'. The page draws with the same
script as the offline HTML file of `qkv explain --html` (qkv/inspect/assets/explain.js).
"""

__all__: list[str] = []

"""Bytes in from the app: listeners, our uvicorn protocol subclasses, the response writer, accept, admin, and the transparent listener of the egress lock."""

"""The raw ASGI app for HTTP requests: route -> policy -> headers -> resilient send -> relay raw bytes."""

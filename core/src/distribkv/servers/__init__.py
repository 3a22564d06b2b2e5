"""The HTTP server plugins the core ships (``waitress``); others are distributions of their own
(``distribkv-granian``)."""

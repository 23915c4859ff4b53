"""The store's own web page and the HTTP side of the health endpoint (aiohttp on the daemon's loop).

`server.py` serves `/metrics`, `/healthz`, the page `/` and its JSON APIs; `views.py` turns the
running daemon into the small documents the page polls (counts, states and names only);
`access.py` decides who may read them (a token off loopback) and loads the TLS certificate.
The page itself (`static/`) is plain HTML, CSS and JavaScript with hand-drawn SVG charts.
"""

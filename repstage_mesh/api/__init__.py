"""The REST API (aiohttp): endpoints, the error shape, OpenAPI, auth, and the client side that
one node uses to call another (peers.py). Only this room turns domain results into HTTP."""

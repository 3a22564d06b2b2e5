"""The HTTP layer: the server contract and, later, the Falcon application."""

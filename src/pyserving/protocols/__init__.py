"""Protocols: thin adapters between a wire format and the data plane, mounted on the transports."""

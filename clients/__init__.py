"""Clients of Warren, outside the server package: a device simulator and a backend client."""

"""Listening: which protocol serves a connection, TLS contexts, byte relays."""

"""What sits between sockets and protocols: TLS contexts (more to come: listeners, relays)."""

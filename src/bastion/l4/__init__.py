"""L4 listeners: TCP relays (optionally behind TLS termination) and TLS passthrough by SNI."""

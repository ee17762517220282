"""The admin listener: status, Prometheus metrics, drain and reload (docs/admin.md)."""

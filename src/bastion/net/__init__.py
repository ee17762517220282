"""Transport-level pieces shared by protocols: the byte relay."""

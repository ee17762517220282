"""Bastion: an API gateway and load balancer in one program."""

__version__ = "0.1.0"

"""Hashing schemes: the contract, ``modulo`` (FNV-1 64, as the Go original) and ``ring``."""

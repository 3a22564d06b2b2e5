"""Storage: the contract, the record envelope and the in-memory backend."""

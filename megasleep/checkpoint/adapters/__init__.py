"""One adapter per foreign checkpoint family (base.py has the contract and the registry)."""

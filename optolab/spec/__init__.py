"""Protocols: schema, loader, post-hoc conditions, footprint guard, plain-words description."""

"""Protocols: the schema, the YAML loader, post-hoc conditions, the footprint guard and the plain-words description."""

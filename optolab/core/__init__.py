"""The base layer: errors, strict scalar types and plugin loading; imports nothing else of optolab."""

"""The built-in clamp kinds, one module each (the interface: :mod:`optolab.clamps.kind`)."""

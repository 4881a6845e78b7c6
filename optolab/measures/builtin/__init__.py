"""The built-in progress measures, one module each (the interface: :mod:`optolab.measures.measure`)."""

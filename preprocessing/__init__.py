"""Gateway-side imaging: decode per transfer syntax, slice geometry, normalisation to model input, array
backends (numpy, CuPy, DALI) and the cheap anatomy checks content-aware routing uses."""

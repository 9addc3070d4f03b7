"""Galaxy images, synthetic galaxies and mock lens observations."""

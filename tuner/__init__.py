"""tunewatch control plane."""

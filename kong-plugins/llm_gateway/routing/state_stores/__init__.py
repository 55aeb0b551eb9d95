"""One module per backend behind the interface its parent module defines (as Kong's rate-limiting/policies/)."""

"""MLS (RFC 9420), sans-I/O, one module per RFC concept."""

"""Fleet identity: SPIFFE names, X.509 device and delegation certificates, CRLs and relay auth tokens.

Pure code over `cryptography` and `asn1crypto`: signing goes through a `Signer` (a hardware key handle or a
software key), and every check takes `now` from the caller.
"""

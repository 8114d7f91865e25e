"""The relay (`agw-relay`): authenticates gateways and routes ciphertext it cannot read."""

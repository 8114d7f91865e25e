"""Sans-I/O protocol code: bytes in, bytes and events out. No sockets, no asyncio, no clocks read here."""

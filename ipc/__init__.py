"""Inter-process parts of ringserve: the wire codec and the shared-memory rings.

Nothing in this package does socket or event-loop I/O: the front process and
the clients feed it bytes and get messages back (sans-IO), so the same code
serves the asyncio daemon, the blocking client and the tests.
"""

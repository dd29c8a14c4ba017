"""front: one front process (connections, requests, auth, limits)."""

"""tools: offline commands over what the daemon wrote."""

"""serving: a request's path between a front's connection and a worker."""

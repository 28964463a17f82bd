"""The API's routers, one per resource: ops (health, metrics), models, keys, inferences."""

"""The API's routers, one per resource: ops (health, metrics), models, keys, inferences."""

API_VERSION = "v1"
API_PREFIX = f"/{API_VERSION}"  # models, keys and inferences live under it; ops routes do not

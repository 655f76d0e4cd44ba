"""Names of the Envoy resources rendered for a service, all in one place.

Per service `s` (a DNS label):

| resource            | name                          |
| ------------------- | ----------------------------- |
| primary cluster     | `s-primary` (`s-primary-e<epoch>` with the epoch_cluster strategy) |
| read cluster        | `s-read`                      |
| primary listener    | `s-primary-listener`          |
| read listener       | `s-read-listener`             |
| primary routes (http) | `s-primary-routes`          |
| read routes (http)  | `s-read-routes`               |

ClusterLoadAssignments carry their cluster's name. Every name ends in a suffix that no
other suffix ends with, so two services never render the same name. The fence (health_fence
strategy) is shared by all services: listener `repstage-fence-listener`, routes
`repstage-fence-routes`, answering `/fence/<service>/<member>`.
"""

from __future__ import annotations

FENCE_LISTENER = "repstage-fence-listener"
FENCE_LISTENER_ALT = "repstage-fence-alt-listener"  # fence_port + 1 (see render: rotation)
FENCE_ROUTES = "repstage-fence-routes"
METADATA_NAMESPACE = "repstage"


def primary_cluster(service: str) -> str:
    return f"{service}-primary"


def epoch_cluster(service: str, epoch: int) -> str:
    return f"{service}-primary-e{epoch}"


def read_cluster(service: str) -> str:
    return f"{service}-read"


def primary_listener(service: str) -> str:
    return f"{service}-primary-listener"


def read_listener(service: str) -> str:
    return f"{service}-read-listener"


def primary_routes(service: str) -> str:
    return f"{service}-primary-routes"


def read_routes(service: str) -> str:
    return f"{service}-read-routes"


def fence_check_path(service: str) -> str:
    """The path Envoy's health check asks for; the member travels in the Host header."""
    return f"/fence/{service}"


def fence_path(service: str, member: str) -> str:
    """The same answer for people: `curl http://127.0.0.1:<fence_port>/fence/<service>/<member>`."""
    return f"/fence/{service}/{member}"

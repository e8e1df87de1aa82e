"""Which node a request belongs to: the node its session or job id names."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from service.config import NODE_NAME, ClusterConfig
from service.errors import ApiError
from service.schemas import ERROR, Reply

# The routes whose {id} is a session's or a job's: every one of them belongs to the owner.
# (/v1/jobs/secret is a route of its own, matched before /v1/jobs/{id}.)
_OWNED = ("/v1/containers/{id}", "/v1/jobs/{id}")
# What those routes may also answer in a cluster.
NODE_GONE = Reply(410, "node_gone: the node that holds it cannot be reached (stopped or "
                  "lost: its sessions ended with it)", ERROR)


@dataclass(frozen=True)
class Owner:
    node: str
    url: str            # its base URL
    id: str             # the session's or job's id, for messages


def node_of(item_id: str) -> str | None:
    """The node an id names (None: an id of a single node, or not an id at all)."""
    node, sep, _ = item_id.partition(".")
    return node if sep and NODE_NAME.fullmatch(node) else None


def owner_of(request: web.Request, config: ClusterConfig, forwarded: bool) -> Owner | None:
    """The other node `request` must go to, None when this node serves it. `forwarded`: a
    peer sent it here, so it is served here whatever it names (never sent on again: nodes
    whose peers disagree cannot pass a request round in a loop)."""
    if config.node is None or forwarded:
        return None
    item_id = request.match_info.get("id")
    resource = request.match_info.route.resource
    if item_id is None or resource is None or not resource.canonical.startswith(_OWNED):
        return None
    node = node_of(item_id)
    if node is None or node == config.node:
        return None
    url = config.url_of(node)
    if url is None:
        # It cannot have been made in this cluster: the same 404 as any unknown id.
        what = "job" if resource.canonical.startswith("/v1/jobs/") else "container"
        raise ApiError(404, "not_found", f"id: no {what} {item_id[:128]!r}: it names node "
                       f"{node!r}, which this cluster does not know (cluster.peers)", "id")
    return Owner(node, url, item_id)

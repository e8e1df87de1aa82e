"""Many nodes: a session or a job lives on the node that made it, and its id begins with that
node's name (`n1.3f9c...`, `n1.job_...`). A request for it that reaches another node (a load
balancer sends any request anywhere) is forwarded to the owner with the caller's own
Authorization, so the owner checks the token and the tenancy as for a request made to it;
an owner that cannot be reached is a prompt 410 `node_gone`, never a hang."""

from service.cluster.forward import FORWARDED_BY, NODE_HEADER, Forwarder, cluster_middleware
from service.cluster.routing import Owner, node_of, owner_of

__all__ = ["FORWARDED_BY", "NODE_HEADER", "Forwarder", "Owner", "cluster_middleware",
           "node_of", "owner_of"]

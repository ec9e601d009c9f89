"""``dmc agent``: one workload's SVID, kept renewed and served on a local Unix socket.

SPEC §8. Mesh proxies fetch it over Envoy's Secret Discovery Service (`dmc.agent.sds`),
SPIFFE clients over the SPIFFE Workload API (`dmc.agent.workload_api`); both read one
`dmc.agent.feed.IdentityFeed`, and `dmc.agent.socket` guards the socket path.
"""

from dmc.agent.server import AgentConfig, AgentServer, run_agent

__all__ = ["AgentConfig", "AgentServer", "run_agent"]

"""Scale-out on Ray Serve (`loraquilt serve-ray`, the `ray` extra): replicas of the engine
behind Ray Serve's gRPC proxy, requests routed to a replica that has their adapters.

config -> app (deployments, start) -> ingress (gRPC methods, routing) -> replica (one engine each) ->
resident (which adapters an engine holds) and directory (registrations, for all).
Importing this package imports nothing from Ray; its modules do."""

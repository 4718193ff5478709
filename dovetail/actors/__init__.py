"""The Ray actor system: thin wrappers around ``dovetail.models`` (see each module).

    driver (launch.py / API / Serve) --Ray RPC per request--> Coordinator
    Coordinator --zmq + shared memory per step--> DraftWorker, TargetShard x N (gloo inside layers)

Ray places the actors, restarts them and carries one call per request; every per-step message
goes over the ``dovetail.protocol`` channels.
"""

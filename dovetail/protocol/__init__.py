"""The hot-path protocol between coordinator, draft and target shards (no pickle, no Ray RPC).

* ``messages``: typed, versioned control messages, encoded with msgpack.
* ``shm``: named shared-memory arenas; arrays travel as references, read as zero-copy numpy views.
* ``channel``: pyzmq ipc channels that carry the encoded messages.
"""

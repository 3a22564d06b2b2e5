"""The node's serving layer: from a server plugin's request to the node's answer.

A GET ``/get?key=K``:

1. the server plugin parses it and calls ``Listen.direct`` (granian) or the WSGI application
   (waitress), through :class:`~distribkv.http.wrapper.ServingWrapper` (drain, access log);
2. :class:`~distribkv.http.app.NodeApp` hands it to :meth:`~distribkv.http.kv.KeyValue.get`;
3. which checks the map fingerprint and the key, and asks :class:`~distribkv.http.routing.Router`
   where the key is answered: here, or a 307 / a forward to its owner (421, 403 refused);
4. here: ``node.get(key)`` reads the storage once (a replica adds its lag, or 503 resyncing);
5. the answer, 200 with the value or 404, goes back the way it came.

A SET ``PUT /set?key=K`` with the value as its body:

1. the server reads the body (bounded by ``Listen.body_check``) and calls the same entry;
2. :meth:`~distribkv.http.kv.KeyValue.set` checks map, key and value size (one check,
   :class:`~distribkv.http.limits.Limits`) and routes it as a write (a replica redirects it);
3. on a server that can answer later, ``node.write_later`` queues it for the group committer
   (:mod:`distribkv.replication.committer`); otherwise ``node.write`` waits for it;
4. the committer appends its group to the log store in one storage apply (one fsync);
5. the committer's thread finishes the request's completion: 200, sent by the server.

A DELETE is a SET without a value. Every other route is a Falcon resource of
:func:`~distribkv.http.app.create_app`; errors of every path are answered by the one mapping
in :mod:`distribkv.http.errors`. The server contract is :mod:`distribkv.http.api`.
"""

"""One Kubernetes API client per configuration, shared by every reconcile.

`client.CustomObjectsApi()` with no argument builds a new ApiClient, with its own connection pool,
so every call paid a fresh TLS handshake with the API server (operator and API server side both):
bench/operator_scale.py's py-spy profile put a third of the operator's CPU in `connect`/SSL wrap.
The shared client is keyed by the active configuration (host and credentials), so a process that
switches kubeconfig (tests do) gets a client for the new one.
"""
from __future__ import annotations

import threading

from kubernetes import client

# The kubernetes package imports each API module on first attribute access (core_v1_api is large):
# resolved here, at operator start, not inside the first burst of reconciles, which queued on the import lock.
_APIS = (client.CustomObjectsApi, client.CoreV1Api, client.NetworkingV1Api)
_lock = threading.Lock()
_clients: dict[tuple, client.ApiClient] = {}


def api_client() -> client.ApiClient:
    config = client.Configuration.get_default_copy()
    key = (config.host, repr(sorted(config.api_key.items())), config.cert_file, config.key_file,
           config.ssl_ca_cert, config.verify_ssl)
    with _lock:
        if key not in _clients:
            # kopf runs reconciles in a thread pool: enough pooled connections that none is dropped.
            config.connection_pool_maxsize = max(config.connection_pool_maxsize or 0, 32)
            _clients[key] = client.ApiClient(config)
        return _clients[key]


def custom_objects() -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api_client())


def core() -> client.CoreV1Api:
    return client.CoreV1Api(api_client())


def networking() -> client.NetworkingV1Api:
    return client.NetworkingV1Api(api_client())

"""The chart's API-key bootstrap: creates the first tenant in the store and puts its API key
into a Kubernetes Secret, since `farm tenants create` prints a key once and keeps only its
hash. Runs as a Helm hook Job after every install and upgrade; once the Secret exists it
does nothing, so the key clients hold stays valid.

It talks to the API server with the Job's service account (get and create of that one
Secret), in the standard library: the farm image carries no Kubernetes client."""

from __future__ import annotations

import json
import os
import ssl
import sys
import urllib.error
import urllib.request

SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"


def issue_key(store, tenant: str) -> str:
    """A new API key of `tenant`: made with the tenant, or (where the tenant exists already,
    say the `default` one a gateway creates at its first start and whose key it writes only
    into its own pod) a rotated one, which revokes the keys nobody could read."""
    from farm.domain.errors import AlreadyExists

    if store.tenant_by_name(tenant) is None:
        try:
            return store.create_tenant(tenant)[1]
        except AlreadyExists:  # a gateway created it meanwhile
            pass
    return store.rotate_key(tenant)


def _api(method: str, path: str, body: dict | None = None) -> dict:
    with open(f"{SERVICE_ACCOUNT}/token") as f:
        token = f.read().strip()
    url = f"https://{os.environ['KUBERNETES_SERVICE_HOST']}:{os.environ['KUBERNETES_SERVICE_PORT']}{path}"
    request = urllib.request.Request(
        url, method=method, data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    context = ssl.create_default_context(cafile=f"{SERVICE_ACCOUNT}/ca.crt")
    with urllib.request.urlopen(request, context=context, timeout=30) as response:
        return json.load(response)


def _secret_exists(namespace: str, name: str) -> bool:
    try:
        _api("GET", f"/api/v1/namespaces/{namespace}/secrets/{name}")
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return False
        raise
    return True


def main() -> int:
    from farm.config import load_config
    from farm.jobs.store import JobStore

    tenant, secret = os.environ["FARM_TENANT"], os.environ["FARM_API_KEY_SECRET"]
    with open(f"{SERVICE_ACCOUNT}/namespace") as f:
        namespace = f.read().strip()
    if _secret_exists(namespace, secret):
        print(f"Secret {secret} exists: tenant {tenant!r} has its key, nothing to do")
        return 0
    config = load_config()
    store = JobStore(config.store_url, migrate=config.store.migrate)
    try:
        key = issue_key(store, tenant)
    finally:
        store.close()
    _api("POST", f"/api/v1/namespaces/{namespace}/secrets", {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": secret, "labels": json.loads(os.environ.get("FARM_SECRET_LABELS", "{}"))},
        "stringData": {"api-key": key, "tenant": tenant},
    })
    print(f"tenant {tenant!r}: its API key is in Secret {secret} (key api-key)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

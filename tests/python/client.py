"""The official Kubernetes Python client against MetaManager's local API.

Run by tests/python_client.rs, one step per call, with the endpoint's address:
  client.py list HOST NAMESPACE          -> {"names": [...], "resourceVersion": "..."}
  client.py watch HOST NAMESPACE VERSION -> {"events": [[type, name], ...]}
  client.py devices HOST NAMESPACE       -> {"names": [...]} through the dynamic client
Each prints one JSON object on stdout.
"""

import json
import sys

from kubernetes import client, dynamic, watch


def api_client(host):
    config = client.Configuration()
    config.host = host
    return client.ApiClient(config)


def main():
    step, host, namespace = sys.argv[1], sys.argv[2], sys.argv[3]
    api = api_client(host)
    core = client.CoreV1Api(api)
    if step == "list":
        pods = core.list_namespaced_pod(namespace)
        print(json.dumps({
            "names": [p.metadata.name for p in pods.items],
            "resourceVersion": pods.metadata.resource_version,
        }))
    elif step == "watch":
        events = []
        stream = watch.Watch().stream(
            core.list_namespaced_pod,
            namespace,
            resource_version=sys.argv[4],
            timeout_seconds=2,
        )
        for event in stream:
            events.append([event["type"], event["object"].metadata.name])
        print(json.dumps({"events": events}))
    elif step == "devices":
        models = dynamic.DynamicClient(api).resources.get(
            api_version="devices.kubeedge.io/v1beta1", kind="DeviceModel"
        )
        items = models.get(namespace=namespace).items
        print(json.dumps({"names": [m.metadata.name for m in items]}))
    else:
        sys.exit(f"unknown step {step}")


if __name__ == "__main__":
    main()

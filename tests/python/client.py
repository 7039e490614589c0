"""The official Kubernetes Python client against MetaManager's local API.

Run by tests/python_client.rs, one step per call, with the endpoint's address:
  client.py list HOST NAMESPACE          -> {"names": [...], "resourceVersion": "..."}
  client.py watch HOST NAMESPACE VERSION -> {"events": [[type, name], ...]}
  client.py devices HOST NAMESPACE       -> {"names": [...]} through the dynamic client
  client.py status HOST NAMESPACE NAME   -> {"conditions": [[type, status], ...]} after
                                            patching the pod's status (Ready: False)
  client.py label HOST NAMESPACE NAME    -> {"status": 503, "reason": "..."} for a label
                                            patch that the cloud must make
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
    elif step == "status":
        body = {"status": {"conditions": [{"type": "Ready", "status": "False"}]}}
        pod = core.patch_namespaced_pod_status(sys.argv[4], namespace, body)
        print(json.dumps({
            "conditions": [[c.type, c.status] for c in pod.status.conditions],
        }))
    elif step == "label":
        body = {"metadata": {"labels": {"tier": "edge"}}}
        try:
            core.patch_namespaced_pod(sys.argv[4], namespace, body)
            print(json.dumps({"status": 200}))
        except client.ApiException as e:
            print(json.dumps({"status": e.status, "reason": json.loads(e.body)["reason"]}))
    else:
        sys.exit(f"unknown step {step}")


if __name__ == "__main__":
    main()

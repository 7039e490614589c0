"""The official Kubernetes Python client against MetaManager's local API.

Run by tests/python_client.rs, one step per call, with the endpoint's address:
  client.py list HOST NAMESPACE          -> {"names": [...], "resourceVersion": "..."}
  client.py watch HOST NAMESPACE VERSION -> {"events": [[type, name], ...]}
  client.py devices HOST NAMESPACE       -> {"names": [...], "kind", "apiVersion", "items":
                                            [[kind, apiVersion], ...]} through the dynamic client
  client.py informer HOST NAMESPACE TIMEOUT
                                         -> one JSON line per step, as it happens: an
                                            informer's loop (list once, then watch from the
                                            last version seen, resuming whenever the stream
                                            ends or breaks; TIMEOUT > 0 asks for
                                            timeoutSeconds), until an event for the pod `stop`
  client.py status HOST NAMESPACE NAME   -> {"conditions": [[type, status], ...]} after
                                            patching the pod's status (Ready: False)
  client.py label HOST NAMESPACE NAME    -> {"status": 503, "reason": "..."} for a label
                                            patch that the cloud must make
Each prints one JSON object on stdout.
"""

import json
import sys
import time

from kubernetes import client, dynamic, watch


def out(line):
    print(json.dumps(line), flush=True)


def informer(core, namespace, timeout):
    """An informer's list and watch loop, as client-go's reflector runs it: one list, then
    watches from the last version seen (an event's or a bookmark's), never listing again
    unless told the version expired, which ends this loop instead."""
    pods = core.list_namespaced_pod(namespace)
    version = pods.metadata.resource_version
    out({"listed": [p.metadata.name for p in pods.items], "resourceVersion": version})

    def watching(*args, **kwargs):
        # Called by the stream for each watch request; the response head has arrived when
        # it returns, so the server is watching.
        response = core.list_namespaced_pod(*args, **kwargs)
        out({"watching": kwargs.get("resource_version")})
        return response

    while True:
        w = watch.Watch(return_type="V1Pod")
        options = {"resource_version": version, "allow_watch_bookmarks": True}
        if timeout > 0:
            options["timeout_seconds"] = timeout
        try:
            for event in w.stream(watching, namespace, **options):
                version = w.resource_version
                if event["type"] == "BOOKMARK":
                    continue
                pod = event["object"]
                out({"event": event["type"], "name": pod.metadata.name,
                     "version": pod.metadata.resource_version,
                     "phase": pod.status.phase if pod.status else None})
                if pod.metadata.name == "stop":
                    return
            out({"ended": version})
        except client.ApiException as e:
            out({"refused": e.status, "version": version})
            return
        except Exception as e:  # the connection broke: MetaManager restarts
            out({"broken": type(e).__name__, "version": version})
            time.sleep(0.2)


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
        listed = models.get(namespace=namespace)
        print(json.dumps({
            "names": [m.metadata.name for m in listed.items],
            "kind": listed.kind,
            "apiVersion": listed.apiVersion,
            "items": [[m.kind, m.apiVersion] for m in listed.items],
        }))
    elif step == "informer":
        informer(core, namespace, int(sys.argv[4]))
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

//! `kubectl describe` on every kind the API serves: kubectl lists the object's events by field
//! selector (`involvedObject.name`, `.namespace`, `.kind`, `.uid`) after reading it, and fails
//! the whole command when the events list refuses the selector.

mod common;

use common::kubectl::{kubectl_home, kubectl_out};
use common::{fixture, insert, TestApp, NODE};
use serde_json::{json, Value};

/// A core `v1` event about `kind` `name`, as edged writes one.
fn event(name: &str, about: (&str, &str, &str, &str), reason: &str) -> Value {
    let (kind, namespace, object, uid) = about;
    json!({"apiVersion": "v1", "kind": "Event",
        "metadata": {"name": name, "namespace": if namespace.is_empty() { "default" } else { namespace }},
        "involvedObject": {"kind": kind, "namespace": namespace, "name": object, "uid": uid},
        "reason": reason, "message": format!("{reason} happened"), "type": "Normal",
        "source": {"component": "edged"}, "count": 1,
        "firstTimestamp": "2026-11-27T10:15:00Z", "lastTimestamp": "2026-11-27T10:15:00Z"})
}

/// The text of `describe` after its `Events:` heading.
fn events_part(described: &str) -> &str {
    let at = described
        .find("Events:")
        .unwrap_or_else(|| panic!("no Events: in {described}"));
    &described[at..]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_works_on_every_kind_and_shows_stored_events() {
    let Some(home) = kubectl_home() else {
        return;
    };
    let mut app = TestApp::embedded().await;
    let pod = fixture("pod.json");
    let pod_name = pod["metadata"]["name"].as_str().unwrap().to_owned();
    let pod_uid = pod["metadata"]["uid"].as_str().unwrap().to_owned();
    insert(&mut app, &format!("default/pod/{pod_name}"), pod).await;
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "demo", "namespace": "default", "uid": "cm-uid-1"},
        "data": {"a": "1"}});
    insert(&mut app, "default/configmap/demo", cm).await;
    let node = json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": NODE, "uid": "node-uid-1"}, "status": {}});
    insert(&mut app, &format!("default/node/{NODE}"), node).await;
    let model = json!({"apiVersion": "devices.kubeedge.io/v1beta1", "kind": "DeviceModel",
        "metadata": {"name": "thermometer", "namespace": "default", "uid": "dm-uid-1"},
        "spec": {"protocol": "modbus"}});
    insert(&mut app, "default/devicemodel/thermometer", model).await;

    // MetaManager stores no event (they are passed on): without one, every describe works and
    // says there are none.
    let port = app.http_port;
    let objects: [&[&str]; 4] = [
        &["pod", &pod_name, "-n", "default"],
        &["configmap", "demo", "-n", "default"],
        &["node", NODE],
        &["devicemodels", "thermometer", "-n", "default"],
    ];
    for args in objects {
        let described = kubectl_out(port, home.path(), &[&["describe"], args].concat());
        assert!(
            events_part(&described).contains("<none>"),
            "{args:?}: {described}"
        );
    }

    // Events written into the database by other means (an earlier version, an import) are
    // served, and each describe shows its object's own: found by the selectors kubectl sends.
    app.terminate();
    let rows = [
        (
            "pod-event",
            event(
                "pod-event",
                ("Pod", "default", &pod_name, &pod_uid),
                "Pulled",
            ),
        ),
        (
            "cm-event",
            event(
                "cm-event",
                ("ConfigMap", "default", "demo", "cm-uid-1"),
                "Synced",
            ),
        ),
        // The kubelet names a node by its name in place of its uid; kubectl asks both ways.
        (
            "node-event",
            event("node-event", ("Node", "", NODE, NODE), "NodeReady"),
        ),
        (
            "dm-event",
            event(
                "dm-event",
                ("DeviceModel", "default", "thermometer", "dm-uid-1"),
                "Modelled",
            ),
        ),
        // The same names, another kind: not shown for the configmap.
        (
            "other-event",
            event(
                "other-event",
                ("Secret", "default", "demo", "s-uid"),
                "Elsewhere",
            ),
        ),
    ];
    let db = rusqlite::Connection::open(app.db_path()).unwrap();
    for (name, value) in &rows {
        db.execute(
            "INSERT INTO meta (key, type, value) VALUES (?1, 'event', ?2)",
            (format!("default/event/{name}"), value.to_string()),
        )
        .unwrap();
    }
    drop(db);
    app.start().await;

    let port = app.http_port;
    for (args, reason) in objects
        .into_iter()
        .zip(["Pulled", "Synced", "NodeReady", "Modelled"])
    {
        let described = kubectl_out(port, home.path(), &[&["describe"], args].concat());
        let events = events_part(&described);
        assert!(events.contains(reason), "{args:?}: {described}");
        assert!(
            !events.contains("Elsewhere"),
            "another kind's event: {described}"
        );
        let shown = ["Pulled", "Synced", "NodeReady", "Modelled"]
            .iter()
            .filter(|r| events.contains(**r))
            .count();
        assert_eq!(shown, 1, "only its own event: {described}");
    }
}

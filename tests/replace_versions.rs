//! The versions query and `replace`, from a hand-played cloud (the bench's cloud player), on
//! both brokers: the real binary, a real broker, a real database.
// The bench's harness brings its own copy of tests/common/process.rs.
#![allow(clippy::duplicate_mod)]

mod common;

#[path = "../benches/metamanager/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::time::Duration;

use common::{count_rows, BrokerKind, Options, TestApp, NODE};
use harness::cloud::Cloud;
use serde_json::{json, Value};

fn pod(name: &str, rv: u64) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"),
                        "resourceVersion": rv.to_string()},
           "spec": {"containers": [{"name": "c", "image": "nginx"}]}})
}

async fn start(
    kind: BrokerKind,
    options: impl FnOnce(Options) -> Options,
) -> Option<(TestApp, Cloud)> {
    let app = TestApp::spawn(options(Options::new(kind))).await?;
    let cloud = Cloud::connect(app.port, "edge", NODE).await;
    Some((app, cloud))
}

/// The cloud inserts `names` and the node stores them.
async fn seed(cloud: &mut Cloud, names: &[&str]) {
    let mut inserts = Vec::new();
    for name in names {
        let key = format!("default/pod/{name}");
        cloud.objects.insert(key.clone(), pod(name, 1));
        inserts.push(("insert", key, pod(name, 1)));
    }
    cloud.send_all(inserts).await;
}

/// What edged was passed, in order: `(operation, resource)` of each insert, update and delete
/// received within a quiet second.
async fn forwarded(app: &mut TestApp) -> Vec<(String, String)> {
    app.client
        .drain(Duration::from_secs(1))
        .await
        .into_iter()
        .filter(|(topic, _)| topic == "metamanager/to/edged")
        .map(|(_, m)| {
            let route = &m["route"];
            (
                route["operation"].as_str().unwrap_or_default().to_owned(),
                route["resource"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
    expected
        .iter()
        .map(|(o, r)| (o.to_string(), r.to_string()))
        .collect()
}

async fn removes_a_pod_kept_after_its_delete_was_lost(kind: BrokerKind) {
    let Some((mut app, mut cloud)) = start(kind, |o| o).await else {
        return;
    };
    cloud.link_up().await;
    seed(&mut cloud, &["a", "b", "c"]).await;
    // The cloud deletes `b` while the link is down; its delete never reaches the node.
    cloud.link_down().await;
    cloud.objects.remove("default/pod/b");
    assert!(app
        .client
        .query("edged", "default/pod/b")
        .await
        .as_array()
        .is_some_and(|a| a.len() == 1));
    app.client.drain(Duration::from_millis(200)).await;

    cloud.link_up().await;
    let answer = cloud.replace("default/pod", "after-outage", 100).await;
    assert_eq!(
        answer["content"],
        json!({"inserted": 0, "updated": 0, "deleted": 1, "unchanged": 2})
    );
    assert_eq!(
        app.client.query("edged", "default/pod/b").await,
        json!([]),
        "removed"
    );
    assert_eq!(
        forwarded(&mut app).await,
        pairs(&[("delete", "default/pod/b")]),
        "edged told, once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replace_from_a_hand_played_cloud_removes_a_pod_the_node_kept_after_its_delete_was_lost_embedded(
) {
    removes_a_pod_kept_after_its_delete_was_lost(BrokerKind::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replace_from_a_hand_played_cloud_removes_a_pod_the_node_kept_after_its_delete_was_lost_mosquitto(
) {
    removes_a_pod_kept_after_its_delete_was_lost(BrokerKind::Mosquitto).await;
}

async fn pages_apply_once_and_forward_in_key_order(kind: BrokerKind) {
    let Some((mut app, mut cloud)) = start(kind, |o| o).await else {
        return;
    };
    cloud.link_up().await;
    seed(&mut cloud, &["a", "c", "e", "g"]).await;
    app.client.drain(Duration::from_millis(200)).await;
    let changes_before = count_rows(&app, "SELECT count(*) FROM changes");

    // The cloud's set: `a` unchanged, `c` newer, `e` gone, `b` and `f` new, `g` unchanged.
    cloud.objects.remove("default/pod/e");
    cloud.objects.insert("default/pod/c".into(), pod("c", 2));
    cloud.objects.insert("default/pod/b".into(), pod("b", 1));
    cloud.objects.insert("default/pod/f".into(), pod("f", 1));
    let replace_id = "r-1";
    let items: Vec<Value> = cloud.objects.values().cloned().collect();
    for (i, page) in items.chunks(2).enumerate() {
        let last = (i + 1) * 2 >= items.len();
        let content = json!({"replace_id": replace_id, "page": i, "items": page, "last": last});
        let answer = cloud.request("replace", "default/pod", content).await;
        if !last {
            assert_eq!(answer["content"], "OK", "page {i} held");
            assert_eq!(
                count_rows(
                    &app,
                    "SELECT count(*) FROM meta WHERE key = 'default/pod/b'"
                ),
                0,
                "nothing applied before the last page"
            );
        } else {
            assert_eq!(
                answer["content"],
                json!({"inserted": 2, "updated": 1, "deleted": 1, "unchanged": 2})
            );
        }
    }
    assert_eq!(
        forwarded(&mut app).await,
        pairs(&[
            ("insert", "default/pod/b"),
            ("update", "default/pod/c"),
            ("delete", "default/pod/e"),
            ("insert", "default/pod/f")
        ]),
        "each change once, in key order; the unchanged `a` and `g` not passed on"
    );
    assert_eq!(
        count_rows(&app, "SELECT count(*) FROM changes") - changes_before,
        4,
        "each change numbered in the history"
    );
    // Recorded with the replace until the broker acknowledged the forwards, then forgotten.
    assert!(
        common::process::wait_until(common::WAIT, || {
            count_rows(&app, "SELECT count(*) FROM forwards") == 0
        }),
        "acknowledged forwards still recorded"
    );
    let versions = cloud.versions("default/pod").await;
    let keys: Vec<&str> = versions.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "default/pod/a",
            "default/pod/b",
            "default/pod/c",
            "default/pod/f",
            "default/pod/g"
        ]
    );
    assert_eq!(versions["default/pod/c"], "2");
}

/// A kill between a replace's commit and the broker's acknowledgement of its forwards leaves
/// them recorded in `forwards` (written here as the replace's transaction writes them, while
/// MetaManager is stopped): the next start sends them to edged before anything else, in order,
/// and forgets them once the broker has them. On mosquitto, whose subscribers outlive
/// MetaManager's restart, so that edged can listen from before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replace_s_forwards_unacknowledged_at_a_kill_are_sent_after_the_restart() {
    let Some((mut app, mut cloud)) = start(BrokerKind::Mosquitto, |o| o).await else {
        return;
    };
    cloud.link_up().await;
    seed(&mut cloud, &["a"]).await;
    app.kill9();
    let db = rusqlite::Connection::open(app.db_path()).unwrap();
    let b = pod("b", 2).to_string();
    let a = pod("a", 1).to_string();
    db.execute(
        "INSERT INTO forwards (kind, key, value) VALUES (0, 'default/pod/b', ?1), (2, 'default/pod/a', ?2)",
        [&b, &a],
    )
    .unwrap();
    drop(db);
    let mut edged = app.peer().await;
    app.start().await;
    let mut got = Vec::new();
    while got.len() < 2 {
        let m = edged.wait_for("metamanager/to/edged", |_| true).await;
        got.push((
            m["route"]["operation"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            m["route"]["resource"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            m["content"].clone(),
        ));
    }
    assert_eq!(
        got,
        vec![
            ("insert".to_owned(), "default/pod/b".to_owned(), pod("b", 2)),
            ("delete".to_owned(), "default/pod/a".to_owned(), pod("a", 1)),
        ]
    );
    assert!(
        common::process::wait_until(common::WAIT, || {
            count_rows(&app, "SELECT count(*) FROM forwards") == 0
        }),
        "forwards sent again and acknowledged are forgotten"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_pages_are_applied_once_and_each_change_forwarded_in_key_order_embedded() {
    pages_apply_once_and_forward_in_key_order(BrokerKind::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_pages_are_applied_once_and_each_change_forwarded_in_key_order_mosquitto() {
    pages_apply_once_and_forward_in_key_order(BrokerKind::Mosquitto).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfinished_replace_changes_nothing_after_a_disconnect_or_a_restart() {
    let Some((mut app, mut cloud)) = start(BrokerKind::Embedded, |o| o).await else {
        return;
    };
    cloud.link_up().await;
    seed(&mut cloud, &["a"]).await;
    let page = |n: u64, last: bool| json!({"replace_id": "r", "page": n, "items": [pod("z", 1)], "last": last});

    let held = cloud
        .request("replace", "default/pod", page(0, false))
        .await;
    assert_eq!(held["content"], "OK");
    cloud.link_down().await;
    cloud.link_up().await;
    let after = cloud.request("replace", "default/pod", page(1, true)).await;
    assert_eq!(after["route"]["operation"], "error", "{after}");

    let held = cloud
        .request("replace", "default/pod", page(0, false))
        .await;
    assert_eq!(held["content"], "OK");
    drop(cloud);
    app.restart().await;
    let mut cloud = Cloud::connect(app.port, "edge", NODE).await;
    cloud.link_up().await;
    let after = cloud.request("replace", "default/pod", page(1, true)).await;
    assert_eq!(after["route"]["operation"], "error", "{after}");
    assert!(
        after["content"]
            .as_str()
            .unwrap_or_default()
            .contains("changes nothing"),
        "{after}"
    );

    assert_eq!(
        app.client
            .query("edged", "default/pod/a")
            .await
            .as_array()
            .map(Vec::len),
        Some(1),
        "kept"
    );
    assert_eq!(
        app.client.query("edged", "default/pod/z").await,
        json!([]),
        "never added"
    );
}

async fn versions_page_within_the_payload_limit(kind: BrokerKind) {
    let Some((_app, mut cloud)) = start(kind, |mut o| {
        o.max_payload_bytes = 4096;
        o
    })
    .await
    else {
        return;
    };
    cloud.link_up().await;
    let names: Vec<String> = (0..400).map(|i| format!("pod-{i:04}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    seed(&mut cloud, &refs).await;
    cloud.reset_bytes();
    let versions = cloud.versions("default/pod").await;
    assert_eq!(versions.len(), 400);
    assert!(versions.values().all(|rv| rv == "1"));
    // 400 entries of 27 bytes: at least three pages, none above the limit.
    assert!(cloud.bytes_in > 10_000, "{} bytes", cloud.bytes_in);
    assert!(
        cloud.largest_in <= 4096,
        "a page of {} bytes",
        cloud.largest_in
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_versions_of_a_scope_come_in_pages_within_max_payload_bytes_embedded() {
    versions_page_within_the_payload_limit(BrokerKind::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_versions_of_a_scope_come_in_pages_within_max_payload_bytes_mosquitto() {
    versions_page_within_the_payload_limit(BrokerKind::Mosquitto).await;
}

async fn brings_the_node_back(kind: BrokerKind) {
    let Some((_app, mut cloud)) = start(kind, |o| o).await else {
        return;
    };
    cloud.link_up().await;
    let names: Vec<String> = (0..50).map(|i| format!("pod-{i:02}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    seed(&mut cloud, &refs).await;
    cloud.link_down().await;
    // While the link is down the cloud changes five pods and deletes two.
    for i in 0..5 {
        let name = format!("pod-{:02}", i * 10);
        cloud
            .objects
            .insert(format!("default/pod/{name}"), pod(&name, 2));
    }
    cloud.objects.remove("default/pod/pod-07");
    cloud.objects.remove("default/pod/pod-33");
    cloud.link_up().await;
    let done = cloud.reconcile().await;
    assert_eq!(done.scopes, ["default/pod"]);
    assert_eq!((done.sent, done.deleted), (5, 2));
    assert!(cloud.agrees().await, "the node's digest equals the cloud's");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_brings_the_node_back_with_the_digest_versions_and_single_changes_embedded() {
    brings_the_node_back(BrokerKind::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_brings_the_node_back_with_the_digest_versions_and_single_changes_mosquitto() {
    brings_the_node_back(BrokerKind::Mosquitto).await;
}

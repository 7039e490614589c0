//! Server-side Table output (`Accept: application/json;as=Table;g=meta.k8s.io;v=v1`), which
//! kubectl asks for and prints as it comes: for pods the columns a real cluster shows (NAME
//! READY STATUS RESTARTS AGE), for every other kind NAME and AGE. Without it kubectl can only
//! print NAME and AGE, and a pod's state is not visible at a glance.

use std::time::{Duration, SystemTime};

use axum::http::header::ACCEPT;
use axum::http::HeaderMap;
use serde_json::{json, Value};

use super::scope::Kind;

/// Whether the request asks for a Table (kubectl sends it first, JSON after it as a fallback).
pub fn wanted(headers: &HeaderMap) -> bool {
    headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|h| h.to_str().ok())
        .flat_map(|h| h.split(','))
        .any(|range| {
            let mut params = range.split(';').map(str::trim);
            params.next() == Some("application/json")
                && params.any(|p| p.eq_ignore_ascii_case("as=Table"))
        })
}

/// The column definitions of `kind`'s table.
pub fn columns(kind: &Kind) -> Value {
    let column = |name: &str, format: &str, description: &str| json!({"name": name, "type": "string", "format": format, "description": description, "priority": 0});
    let name = column("Name", "name", "Name of the object.");
    let age = column("Age", "", "Time since the object was created.");
    if kind.rtype == crate::resource::rtype::POD {
        json!([
            name,
            column("Ready", "", "Ready containers of all containers."),
            column("Status", "", "The pod's phase, or why it is not running."),
            column("Restarts", "", "Container restarts, summed."),
            age,
        ])
    } else {
        json!([name, age])
    }
}

/// The row of one object: its cells, and its metadata as kubectl expects alongside.
pub fn row(kind: &Kind, object: &Value, now: SystemTime) -> Value {
    let meta = &object["metadata"];
    let name = meta["name"].as_str().unwrap_or("").to_owned();
    let age = meta["creationTimestamp"]
        .as_str()
        .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
        .and_then(|created| now.duration_since(created).ok())
        .map_or_else(|| "<unknown>".to_owned(), human_duration);
    let cells = if kind.rtype == crate::resource::rtype::POD {
        let (ready, status, restarts) = pod_cells(object);
        json!([name, ready, status, restarts, age])
    } else {
        json!([name, age])
    };
    json!({
        "cells": cells,
        "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": meta},
    })
}

/// A Table of `rows`, as a list answer or a watch event's object carries it.
pub fn table(kind: &Kind, rows: Vec<Value>, metadata: Value) -> Value {
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": metadata,
        "columnDefinitions": columns(kind),
        "rows": rows,
    })
}

/// READY, STATUS and RESTARTS of a pod, the way kubectl prints them from a real cluster: a
/// waiting or failed container's reason stands in for the phase, and a pod being deleted is
/// `Terminating`.
fn pod_cells(pod: &Value) -> (String, String, String) {
    let statuses = pod["status"]["containerStatuses"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let total = pod["spec"]["containers"]
        .as_array()
        .map_or(statuses.len(), Vec::len);
    let ready = statuses
        .iter()
        .filter(|s| s["ready"].as_bool() == Some(true))
        .count();
    let restarts: u64 = statuses
        .iter()
        .filter_map(|s| s["restartCount"].as_u64())
        .sum();
    let mut status = pod["status"]["reason"]
        .as_str()
        .or_else(|| pod["status"]["phase"].as_str())
        .unwrap_or("Unknown")
        .to_owned();
    for s in statuses {
        let waiting = s["state"]["waiting"]["reason"].as_str();
        let terminated = s["state"]["terminated"]["reason"].as_str();
        if let Some(reason) = waiting.or(terminated).filter(|r| !r.is_empty()) {
            status = reason.to_owned();
        }
    }
    if !pod["metadata"]["deletionTimestamp"].is_null() {
        status = "Terminating".to_owned();
    }
    (format!("{ready}/{total}"), status, restarts.to_string())
}

/// A duration as kubectl's AGE column writes it: two units at most, coarser as it grows
/// (`45s`, `3m20s`, `2h5m`, `3d4h`, `40d`, `2y10d`).
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    let (m, h, days) = (s / 60, s / 3600, s / 86_400);
    match () {
        _ if s < 120 => format!("{s}s"),
        _ if m < 10 => match s % 60 {
            0 => format!("{m}m"),
            secs => format!("{m}m{secs}s"),
        },
        _ if h < 3 => format!("{m}m"),
        _ if h < 8 => match m % 60 {
            0 => format!("{h}h"),
            mins => format!("{h}h{mins}m"),
        },
        _ if h < 48 => format!("{h}h"),
        _ if h < 24 * 8 => match h % 24 {
            0 => format!("{days}d"),
            hours => format!("{days}d{hours}h"),
        },
        _ if days < 365 * 2 => format!("{days}d"),
        _ if days < 365 * 8 => match days % 365 {
            0 => format!("{}y", days / 365),
            rest => format!("{}y{rest}d", days / 365),
        },
        _ => format!("{}y", days / 365),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn kubectl_s_accept_header_asks_for_a_table() {
        let mut h = HeaderMap::new();
        assert!(!wanted(&h));
        h.insert(
            ACCEPT,
            HeaderValue::from_static(
                "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json",
            ),
        );
        assert!(wanted(&h));
        h.insert(ACCEPT, HeaderValue::from_static("application/json"));
        assert!(!wanted(&h));
    }

    #[test]
    fn ages_read_as_kubectl_writes_them() {
        for (secs, want) in [
            (45, "45s"),
            (119, "119s"),
            (200, "3m20s"),
            (600, "10m"),
            (2 * 3600 + 5 * 60, "125m"),
            (3 * 3600 + 5 * 60, "3h5m"),
            (20 * 3600, "20h"),
            (3 * 86_400 + 4 * 3600, "3d4h"),
            (40 * 86_400, "40d"),
            (2 * 365 * 86_400 + 10 * 86_400, "2y10d"),
            (9 * 365 * 86_400, "9y"),
        ] {
            assert_eq!(human_duration(Duration::from_secs(secs)), want, "{secs}");
        }
    }

    #[test]
    fn pod_cells_show_readiness_reasons_and_restarts() {
        let pod = json!({
            "metadata": {"name": "web", "creationTimestamp": "2026-11-28T10:00:00Z"},
            "spec": {"containers": [{"name": "a"}, {"name": "b"}]},
            "status": {"phase": "Running", "containerStatuses": [
                {"name": "a", "ready": true, "restartCount": 2, "state": {"running": {}}},
                {"name": "b", "ready": false, "restartCount": 3, "state": {"waiting": {"reason": "CrashLoopBackOff"}}},
            ]},
        });
        assert_eq!(
            pod_cells(&pod),
            ("1/2".into(), "CrashLoopBackOff".into(), "5".into())
        );
        let now = humantime::parse_rfc3339("2026-11-28T10:05:00Z").unwrap();
        let pods = &super::super::kinds::builtins()[0];
        assert_eq!(pods.rtype, "pod");
        let r = row(pods, &pod, now);
        assert_eq!(
            r["cells"],
            json!(["web", "1/2", "CrashLoopBackOff", "5", "5m"])
        );
        assert_eq!(r["object"]["metadata"]["name"], "web");
        let mut gone = pod.clone();
        gone["metadata"]["deletionTimestamp"] = json!("2026-11-28T10:04:00Z");
        assert_eq!(pod_cells(&gone).1, "Terminating");
        assert_eq!(
            pod_cells(&json!({})),
            ("0/0".into(), "Unknown".into(), "0".into())
        );
    }
}

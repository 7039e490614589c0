//! Content negotiation: the API speaks JSON only. A client that also accepts JSON (kubectl and
//! client-go list protobuf first, then JSON) gets JSON; one that accepts only something else,
//! such as protobuf, gets `406 Not Acceptable` with a Status, as kube-apiserver answers a type
//! it cannot serve, instead of a body it cannot read.

use axum::extract::Request;
use axum::http::header::ACCEPT;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::scope::ApiError;

/// Whether an `Accept` header admits JSON: `application/json` (with any parameters, such as
/// kubectl's `as=Table`), `application/*` or `*/*`. No header admits anything.
pub fn admits_json(accept: Option<&str>) -> bool {
    let Some(accept) = accept else {
        return true;
    };
    accept.split(',').any(|range| {
        let media = range
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        matches!(
            media.as_str(),
            "application/json" | "application/*" | "*/*" | ""
        )
    })
}

/// Middleware for the API routes.
pub async fn json_only(request: Request, next: Next) -> Response {
    let accept = request
        .headers()
        .get(ACCEPT)
        .map(|h| h.to_str().unwrap_or("?"));
    if admits_json(accept) {
        return next.run(request).await;
    }
    ApiError::NotAcceptable(accept.unwrap_or_default().to_owned()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_served_when_admitted_and_406_otherwise() {
        for ok in [
            None,
            Some("application/json"),
            Some("application/vnd.kubernetes.protobuf, application/json"),
            Some("application/json;as=Table;v=v1;g=meta.k8s.io,application/json"),
            Some("*/*"),
            Some("application/*;q=0.5"),
        ] {
            assert!(admits_json(ok), "{ok:?}");
        }
        for refused in [
            Some("application/vnd.kubernetes.protobuf"),
            Some("application/yaml"),
            Some("text/html"),
        ] {
            assert!(!admits_json(refused), "{refused:?}");
        }
    }
}

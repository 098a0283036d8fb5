//! What the two front doors (`/predict` in [`crate::api`], the Open Inference Protocol in
//! [`crate::v2`]) share, below both: the response extensions their handlers set for the
//! metrics layer, the request-id and trace-id headers, and the ranking of a model's answer.

use std::time::Instant;

use axum::http::HeaderName;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The trace id of the request's span, on every response while traces are exported.
pub const TRACE_ID: HeaderName = HeaderName::from_static("x-trace-id");

/// Set on a response by a handler that resolved a model, for the metrics' `model` label.
#[derive(Debug, Clone)]
pub struct ModelLabel(pub String);

/// Set on a response by a handler that read a request body: when the body was complete.
#[derive(Debug, Clone, Copy)]
pub struct BodyReceived(pub Instant);

/// One class and its probability.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Prediction {
    pub label: String,
    pub index: usize,
    pub probability: f32,
}

/// The `k` most probable classes, highest first (ties by lower index). `k` is capped at the
/// number of classes.
pub fn top_k(probs: &[f32], k: usize, labels: &[String]) -> Vec<Prediction> {
    let k = k.min(probs.len());
    if k == 0 {
        return Vec::new();
    }
    let order = |a: &usize, b: &usize| probs[*b].total_cmp(&probs[*a]).then(a.cmp(b));
    let mut idx: Vec<usize> = (0..probs.len()).collect();
    idx.select_nth_unstable_by(k - 1, order);
    idx.truncate(k);
    idx.sort_unstable_by(order);
    idx.into_iter()
        .map(|i| Prediction {
            label: labels.get(i).cloned().unwrap_or_else(|| i.to_string()),
            index: i,
            probability: probs[i],
        })
        .collect()
}

//! Prometheus metrics: what an operator scrapes from `/metrics`.

use crate::node::Node;

/// The node's counters, gauges and histograms.
#[derive(Default)]
pub struct Metrics {}

/// The Prometheus text exposition of the node's metrics.
pub fn render(_node: &Node) -> String {
    String::new()
}

//! What the server tells its operators: logs and traces (the tracing subscriber and the
//! OpenTelemetry exporter: [`traces`]) and the Prometheus registry ([`metrics`]).

mod metrics;
mod traces;

pub use metrics::*;
pub use traces::*;

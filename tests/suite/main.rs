//! The integration tests that can share one process, as modules of one test binary: it links
//! once, and the generic code they share compiles once instead of once per file. A test file
//! that changes what the whole process sees keeps a binary of its own: tests/otel_tracing.rs
//! and tests/otel_disabled.rs (the global tracing subscriber), tests/hostile_clients.rs and
//! tests/http2_doors.rs (they count the process's open file descriptors), tests/fuzz_http.rs
//! (it counts the panics of every thread).
//!
//! One module: `cargo test --release --test suite accuracy::`.

#[path = "../common/mod.rs"]
mod common;

mod accuracy;
mod aoti;
mod auth;
mod binary;
mod fuzz_preprocess;
mod http_api;
mod layering;
mod malformed_inputs;
mod pipeline;
mod real_model;
mod repository;
mod v2_grpc;
mod v2_rest;

//! tch-serve: an image-classification server for TorchScript models.
//!
//! A request's path, by file: [`api`] (the HTTP front door) -> [`repository`] (which model) ->
//! [`pipeline`] (admission, decoding by [`preprocess`], the queue, the worker) -> [`model`]
//! (libtorch) -> back through a oneshot channel. [`server`] assembles and runs it all;
//! [`shutdown`] turns signals into its one cancellation token. [`v2`] is the Open Inference
//! Protocol (KServe v2) front door, over REST beside [`api`] and over gRPC.

pub mod api;
pub mod auth;
pub mod config;
pub mod error;
pub mod metadata;
pub mod model;
pub mod pipeline;
pub mod preprocess;
pub mod repository;
pub mod server;
pub mod shutdown;
pub mod telemetry;
pub mod v2;

pub use server::{Server, healthcheck, run};

//! tch-serve: an image-classification server for TorchScript models and AOTInductor packages.
//!
//! A request's path, by file: [`api`] (the HTTP front door) -> [`repository`] (which model) ->
//! [`pipeline`] (admission, decoding by [`preprocess`], the queue, the worker) -> [`model`]
//! (libtorch) -> back through a oneshot channel. [`v2`] is the Open Inference Protocol (KServe
//! v2) front door, over REST beside [`api`] and over gRPC. [`server`] assembles and runs it all;
//! [`shutdown`] turns signals into its one cancellation token.
//!
//! Floors, each importing only from those below it: [`server`] (the assembly); the doors
//! [`api`] and [`v2`]; what both doors share: [`state`], [`doors`], [`listener`], [`upload`],
//! [`error`]; [`repository`], [`pipeline`], [`model`]; [`config`], [`preprocess`], [`auth`],
//! [`shutdown`]; [`metadata`] and [`telemetry`].

pub mod api;
pub mod auth;
pub mod config;
pub mod doors;
pub mod error;
pub mod listener;
pub mod metadata;
pub mod model;
pub mod pipeline;
pub mod preprocess;
pub mod repository;
pub mod server;
pub mod shutdown;
pub mod state;
pub mod telemetry;
pub mod upload;
pub mod v2;

pub use server::{Server, healthcheck, run};

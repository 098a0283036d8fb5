//! The server's decode path, compiled from its own source files (not a copy), so that the fuzz
//! target runs exactly what `Preprocessor::run` runs in the server, without linking libtorch.
//! `crate::metadata` in src/preprocess/ resolves to the module below.

#[path = "../../src/metadata.rs"]
pub mod metadata;
#[path = "../../src/preprocess/mod.rs"]
pub mod preprocess;

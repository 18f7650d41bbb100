//! pocketlm: compressed LLMs for phones and small boards.
//!
//! Data flows one way: checkpoint ([`import`]) → [`convert`] → `.plm` file ([`format`]) →
//! memory map → [`model`] → [`session`] → tokens.

pub mod config;
pub mod convert;
pub mod eval;
pub mod ffi;
pub mod format;
pub mod import;
pub mod kernels;
pub mod model;
pub mod sampler;
pub mod session;
pub mod tokenizer;

pub use config::{Architecture, ModelConfig};
pub use model::{Model, ModelError};
pub use session::{GenerateOptions, Generation, GenerationStats, Session, StopReason};

// The C ABI scaffolding for the mobile bindings in [`ffi`] (namespace `pocketlm`).
uniffi::setup_scaffolding!();

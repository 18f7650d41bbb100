//! The pocketlm runtime: runs a memory-mapped `.plm` model.
//!
//! `.plm` file ([`pocketlm_format`]) → [`model`] (the decoder over the mapped weights, with
//! [`pocketlm_kernels`]) → [`session`] (KV cache, generation, chat) → tokens ([`tokenizer`],
//! [`sampler`]).

pub mod constrain;
pub mod cpu;
pub mod model;
pub mod sampler;
pub mod session;
pub mod tokenizer;
pub mod tool_calls;

pub use model::{Model, ModelError};
pub use session::{
    BatchJob, ChatTools, ContextPolicy, Conversation, GenerateOptions, Generation, GenerationStats,
    Session, StopReason, step_batch,
};

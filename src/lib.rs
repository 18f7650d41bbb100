//! pocketlm: compressed LLMs for phones and small boards.
//!
//! Data flows one way: checkpoint ([`import`]) → [`convert`] → `.plm` file ([`format`]) →
//! memory map → [`model`] → [`session`] → tokens.

pub mod config;
pub mod format;
pub mod import;
pub mod sampler;
pub mod tokenizer;

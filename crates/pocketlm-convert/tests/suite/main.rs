//! The converter's integration tests as one test binary: each module was its own binary,
//! and every binary re-links (and re-instantiates the generics of) the whole converter,
//! runtime and candle, which made up a large share of CI's build time. The stories260K
//! end-to-end test (also built for aarch64 by `scripts/test-arm.sh`) and the constrained
//! test (behind its feature) stay separate.

mod common;

mod elastic;
mod eval;
mod families;
mod gguf_import;
mod hostile_inputs;
mod lowrank;
mod plan;
mod ptq;
mod recipe_golden;
mod recover;
mod smollm2;

//! The converter's integration tests as one test binary: each module was its own binary,
//! and every binary re-links (and re-instantiates the generics of) the whole converter,
//! runtime and candle, which made up a large share of CI's build time. The stories260K
//! end-to-end test stays separate: `scripts/test-arm.sh` builds it alone for aarch64.

mod common;

#[cfg(feature = "constrained")]
mod constrained;
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
mod rotation;
mod smollm2;
mod tokenizer_parity;

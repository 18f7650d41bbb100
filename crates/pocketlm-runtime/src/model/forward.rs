//! The forward pass: one sequence on its cache ([`Model::forward`]), or several sequences on
//! their own caches in one pass over the weights ([`Model::forward_batch`]).

use pocketlm_kernels as kernels;

use super::block::{BlockScratch, Segment, block_forward, block_forward_batch};
use super::{KvCache, Logits, Model, ModelError, family};

impl Model {
    /// Runs `tokens` at positions `cache.len()..`, appending their keys/values to `cache`.
    /// Returns `vocab_size` logits for the last token, or for every token with [`Logits::All`].
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        logits: Logits,
    ) -> Result<Vec<f32>, ModelError> {
        let c = &self.config;
        let n = tokens.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        self.check_input(tokens, cache)?;
        let start = cache.len();
        let keep = match logits {
            Logits::Last => 1,
            Logits::All => n,
            Logits::LastN(k) => k.clamp(1, n),
        };
        let bytes = self.activation_bytes(n, keep);
        if bytes > self.options.max_activation_bytes {
            return Err(ModelError::MemoryLimit {
                what: "forward-pass activations",
                capacity: n,
                bytes,
                limit: self.options.max_activation_bytes,
            });
        }
        self.ensure_verified(&[self.token_embd, self.output_norm, self.output])?;
        let mut x = self.embed(tokens);
        let mut scratch = BlockScratch::new(c, n);
        for (l, layer) in self.layers.iter().enumerate() {
            if self.verified.is_some() {
                self.ensure_verified(&layer.indices(self.options.profile))?;
            }
            let weights = self.block_weights(l, layer);
            block_forward(
                c,
                &self.rope,
                &weights,
                &mut x,
                cache,
                l,
                start,
                &mut scratch,
                None,
            );
        }
        cache.advance(n);
        Ok(self.logits_of(&x[(n - keep) * c.hidden_size..]))
    }

    /// Runs several sequences, each on its own cache, through one forward pass: the linear
    /// layers read each weight once for all their rows (continuous batching: the decode
    /// token of every active conversation, plus chunks of prompts still being read).
    /// Returns, per input, the last token's logits when it asked for them.
    pub fn forward_batch(
        &self,
        inputs: &mut [BatchInput<'_>],
    ) -> Result<Vec<Option<Vec<f32>>>, ModelError> {
        let c = &self.config;
        for input in inputs.iter() {
            self.check_input(input.tokens, input.cache)?;
        }
        let n: usize = inputs.iter().map(|i| i.tokens.len()).sum();
        if n == 0 {
            return Ok(inputs.iter().map(|_| None).collect());
        }
        let keep = inputs
            .iter()
            .filter(|i| i.logits && !i.tokens.is_empty())
            .count();
        let bytes = self.activation_bytes(n, keep.max(1));
        if bytes > self.options.max_activation_bytes {
            return Err(ModelError::MemoryLimit {
                what: "batched forward-pass activations",
                capacity: n,
                bytes,
                limit: self.options.max_activation_bytes,
            });
        }
        self.ensure_verified(&[self.token_embd, self.output_norm, self.output])?;
        let tokens: Vec<u32> = inputs
            .iter()
            .flat_map(|i| i.tokens.iter().copied())
            .collect();
        let mut x = self.embed(&tokens);
        let mut scratch = BlockScratch::new(c, n);
        let lengths: Vec<usize> = inputs.iter().map(|i| i.tokens.len()).collect();
        let mut segments: Vec<Segment<'_>> = inputs
            .iter_mut()
            .filter(|i| !i.tokens.is_empty())
            .map(|i| Segment {
                start: i.cache.len(),
                tokens: i.tokens.len(),
                cache: &mut *i.cache,
            })
            .collect();
        for (l, layer) in self.layers.iter().enumerate() {
            if self.verified.is_some() {
                self.ensure_verified(&layer.indices(self.options.profile))?;
            }
            let weights = self.block_weights(l, layer);
            block_forward_batch(
                c,
                &self.rope,
                &weights,
                &mut x,
                &mut segments,
                l,
                &mut scratch,
                None,
            );
        }
        for segment in &mut segments {
            segment.cache.advance(segment.tokens);
        }
        drop(segments);
        // The last row of each input that wants logits, as one matrix.
        let d = c.hidden_size;
        let mut last_rows = Vec::with_capacity(keep * d);
        let mut end = 0;
        for (input, &len) in inputs.iter().zip(&lengths) {
            end += len;
            if input.logits && len > 0 {
                last_rows.extend_from_slice(&x[(end - 1) * d..end * d]);
            }
        }
        let logits = self.logits_of(&last_rows);
        let mut rows = logits.chunks_exact(c.vocab_size);
        Ok(inputs
            .iter()
            .zip(&lengths)
            .map(|(input, &len)| {
                (input.logits && len > 0).then(|| rows.next().unwrap_or_default().to_vec())
            })
            .collect())
    }

    /// Refuses `tokens` that would not fit after what `cache` holds, or that are not in the
    /// vocabulary.
    fn check_input(&self, tokens: &[u32], cache: &KvCache) -> Result<(), ModelError> {
        let needed = cache.len() + tokens.len();
        if needed > cache.capacity() {
            return Err(ModelError::ContextFull {
                needed,
                capacity: cache.capacity(),
            });
        }
        let vocab_size = self.config.vocab_size;
        match tokens.iter().find(|&&t| t as usize >= vocab_size) {
            Some(&id) => Err(ModelError::InvalidToken { id, vocab_size }),
            None => Ok(()),
        }
    }

    /// The embedding rows of `tokens` (scaled where the family says), `tokens × hidden`.
    fn embed(&self, tokens: &[u32]) -> Vec<f32> {
        let d = self.config.hidden_size;
        let mut x = vec![0.0f32; tokens.len() * d];
        let embd = self.matrix(self.token_embd);
        for (t, &tok) in tokens.iter().enumerate() {
            embd.row_to_f32(tok as usize, &mut x[t * d..(t + 1) * d]);
        }
        if let Some(scale) = self.config.features.embedding_scale {
            x.iter_mut().for_each(|v| *v *= scale);
        }
        x
    }

    /// Vocabulary logits of residual-stream `rows` (final norm, output matrix, soft cap).
    fn logits_of(&self, rows: &[f32]) -> Vec<f32> {
        let c = &self.config;
        let count = rows.len() / c.hidden_size;
        if count == 0 {
            return Vec::new();
        }
        let mut normed = vec![0.0f32; rows.len()];
        kernels::rms_norm(
            rows,
            self.vector(self.output_norm),
            c.rms_norm_eps,
            &mut normed,
        );
        let mut out = vec![0.0f32; count * c.vocab_size];
        kernels::matmul(&normed, count, self.matrix(self.output), &mut out);
        if let Some(cap) = c.features.final_logit_softcap {
            family::softcap_in_place(&mut out, cap);
        }
        out
    }
}

/// One sequence of [`Model::forward_batch`]: its new tokens, run at positions
/// `cache.len()..` and appended to `cache`.
pub struct BatchInput<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    /// Return the last token's logits (a prompt chunk that is not the prompt's end needs none).
    pub logits: bool,
}

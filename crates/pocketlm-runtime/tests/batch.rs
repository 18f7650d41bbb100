//! Continuous batching on a real (tiny) model: one forward pass over several sequences gives
//! each the logits it gets alone, and generations stepped together (prompts read in chunks
//! between other sequences' decode steps) say what they say one at a time.

mod common;

use std::sync::Arc;

use common::{greedy, model_file};
use pocketlm_format::Encoding;
use pocketlm_runtime::constrain::OutputConstraint;
use pocketlm_runtime::model::{BatchInput, Logits};
use pocketlm_runtime::tokenizer::ChatMessage;
use pocketlm_runtime::{ChatTools, Model, Session, StopReason, step_batch};

fn model() -> Arc<Model> {
    Arc::new(Model::open(model_file(Encoding::F32)).unwrap())
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn one_pass_over_several_sequences_gives_each_its_own_logits() {
    let model = model();
    let tokenizer = model.tokenizer();
    let prompts = [
        tokenizer.encode_prompt("Once upon a time").unwrap(),
        tokenizer.encode_prompt("The dog").unwrap(),
        tokenizer
            .encode_prompt("Lily and Tom went to the park to play")
            .unwrap(),
    ];
    // Alone: each prompt, then one more token, on its own cache.
    let mut alone = Vec::new();
    for prompt in &prompts {
        let mut cache = model.new_cache(64).unwrap();
        let first = model.forward(prompt, &mut cache, Logits::Last).unwrap();
        let second = model
            .forward(&[prompt[1]], &mut cache, Logits::Last)
            .unwrap();
        alone.push((first, second));
    }
    // Together: all prompts in one pass (one of them asking for no logits), then one token
    // each in a second pass.
    let mut caches: Vec<_> = prompts
        .iter()
        .map(|_| model.new_cache(64).unwrap())
        .collect();
    let mut inputs: Vec<BatchInput<'_>> = prompts
        .iter()
        .zip(&mut caches)
        .enumerate()
        .map(|(i, (prompt, cache))| BatchInput {
            tokens: prompt,
            cache,
            logits: i != 1,
        })
        .collect();
    let first = model.forward_batch(&mut inputs).unwrap();
    assert!(first[1].is_none());
    for (i, logits) in first.iter().enumerate().filter(|(i, _)| *i != 1) {
        let diff = max_abs_diff(logits.as_ref().unwrap(), &alone[i].0);
        assert!(diff < 1e-4, "prompt {i}: {diff}");
    }
    let next: Vec<[u32; 1]> = prompts.iter().map(|p| [p[1]]).collect();
    let mut inputs: Vec<BatchInput<'_>> = next
        .iter()
        .zip(&mut caches)
        .map(|(tokens, cache)| BatchInput {
            tokens,
            cache,
            logits: true,
        })
        .collect();
    let second = model.forward_batch(&mut inputs).unwrap();
    for (i, logits) in second.iter().enumerate() {
        let diff = max_abs_diff(logits.as_ref().unwrap(), &alone[i].1);
        assert!(diff < 1e-4, "decode step of sequence {i}: {diff}");
    }
    for (cache, prompt) in caches.iter().zip(&prompts) {
        assert_eq!(cache.len(), prompt.len() + 1);
    }
}

#[test]
fn stepped_together_generations_match_one_at_a_time() {
    let model = model();
    let prompts = [
        "Once upon a time, there was a little girl named Lily.",
        "The cat",
        "Tom had a big red ball. He liked to",
    ];
    let options = greedy(24);
    let expected: Vec<String> = prompts
        .iter()
        .map(|p| {
            let mut session = Session::new(Arc::clone(&model), 128).unwrap();
            session.complete(p, &options, |_| true).unwrap().text
        })
        .collect();

    let mut sessions: Vec<Session> = prompts
        .iter()
        .map(|_| Session::new(Arc::clone(&model), 128).unwrap())
        .collect();
    let mut streamed = vec![String::new(); prompts.len()];
    let mut jobs = Vec::new();
    for ((session, prompt), text) in sessions.iter_mut().zip(prompts).zip(&mut streamed) {
        let job = session
            .start_completion(&model, prompt, &options, |piece: &str| {
                text.push_str(piece);
                true
            })
            .unwrap();
        jobs.push(job);
    }
    // 5 prompt tokens a step: the long prompt takes several steps while the others decode.
    let mut steps = 0;
    while jobs.iter().any(|j| !j.is_done()) {
        let mut pairs: Vec<_> = sessions.iter_mut().zip(jobs.iter_mut()).collect();
        step_batch(&mut pairs, 5).unwrap();
        steps += 1;
        assert!(steps < 200, "the batch does not finish");
    }
    for (i, (job, session)) in jobs.into_iter().zip(&sessions).enumerate() {
        let generation = job.finish(session).unwrap();
        assert_eq!(generation.text, expected[i], "prompt {i}");
        assert_eq!(generation.stop_reason, StopReason::MaxTokens);
        assert_eq!(generation.stats.generated_tokens, 24);
        // The history is the prompt and the reply, as after `complete`.
        let prompt_len = generation.stats.prompt_tokens;
        assert_eq!(session.history().len(), prompt_len + 24, "prompt {i}");
    }
    drop(sessions);
    assert_eq!(streamed.concat(), expected.concat());
}

#[test]
fn batched_chats_reuse_prefixes_follow_constraints_and_cancel() {
    let model = model();
    let mut sessions: Vec<Session> = (0..3)
        .map(|_| Session::new(Arc::clone(&model), 256).unwrap())
        .collect();
    let chat = [ChatMessage::new("user", "Tell me about a cat.")];
    // A first turn on session 0 alone, so its second turn reuses it.
    let first = sessions[0].chat(&chat, &greedy(8), |_| true).unwrap();
    let mut second_turn = chat.to_vec();
    second_turn.push(ChatMessage::new("assistant", first.text.clone()));
    second_turn.push(ChatMessage::new("user", "And the dog?"));

    let schema = serde_json::json!({
        "type": "object",
        "properties": {"happy": {"type": "boolean"}},
        "required": ["happy"],
        "additionalProperties": false
    });
    let constrained = pocketlm_runtime::GenerateOptions {
        constraint: Some(OutputConstraint::JsonSchema(schema)),
        ..greedy(40)
    };
    let [s0, s1, s2] = &mut sessions[..] else {
        unreachable!()
    };
    let tools = ChatTools::default();
    let mut reuse = s0
        .start_chat(&model, &second_turn, &tools, &greedy(8), |_| true)
        .unwrap();
    let mut json = s1
        .start_chat(&model, &chat, &tools, &constrained, |_| true)
        .unwrap();
    let mut cancelled = s2
        .start_chat(&model, &chat, &tools, &greedy(8), |_| true)
        .unwrap();
    cancelled.cancel();
    while !(reuse.is_done() && json.is_done()) {
        let mut pairs = vec![
            (&mut *s0, &mut reuse),
            (&mut *s1, &mut json),
            (&mut *s2, &mut cancelled),
        ];
        step_batch(&mut pairs, 64).unwrap();
    }
    let reused = reuse.finish(s0).unwrap();
    assert!(
        reused.stats.reused_tokens > first.stats.prompt_tokens,
        "{:?}",
        reused.stats
    );
    let json = json.finish(s1).unwrap();
    assert_eq!(
        json.stop_reason,
        StopReason::ConstraintComplete,
        "{}",
        json.text
    );
    let value: serde_json::Value = serde_json::from_str(&json.text).unwrap();
    assert!(value["happy"].is_boolean(), "{value}");
    let cancelled = cancelled.finish(s2).unwrap();
    assert_eq!(cancelled.stop_reason, StopReason::Cancelled);
    assert!(cancelled.tokens.is_empty());
}

/// One-token steps on the decode team give bit-identical logits to rayon's pool: each task
/// computes the same values whichever thread runs it (f16 rows, q4 tiles, attention heads).
#[test]
fn the_decode_team_gives_the_same_logits_as_rayon() {
    let dir = tempfile::tempdir().unwrap();
    let q4 = dir.path().join("q4.plm");
    pocketlm_convert::convert_path(
        &common::fixture("stories260k/hf"),
        &q4,
        &pocketlm_convert::ConvertOptions::with_weights(Encoding::Q4 {
            group: 32,
            asymmetric: false,
        }),
        &mut |_, _, _| {},
    )
    .unwrap();
    let team = pocketlm_kernels::pool::Team::new(3);
    for path in [model_file(Encoding::F16).to_path_buf(), q4] {
        let model = Model::open(&path).unwrap();
        let tokens = model
            .tokenizer()
            .encode_prompt("Once upon a time there")
            .unwrap();
        let decode = || {
            let mut cache = model.new_cache(64).unwrap();
            let mut all = Vec::new();
            for &token in &tokens {
                all.extend(model.forward(&[token], &mut cache, Logits::Last).unwrap());
            }
            all
        };
        let plain = decode();
        let on_team = team.enter(decode);
        assert_eq!(plain, on_team, "{}", path.display());
    }
}

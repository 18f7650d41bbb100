//! The command line end to end: what scripts rely on (one JSON object on stdout for every
//! `--json` command; global flags reaching the runtime) on the stories260K fixture.

use std::process::Command;

use pocketlm_convert::{ConvertOptions, LowRank, LowRankMethod, RankAllocation, RankTarget};
use pocketlm_format::Encoding;
use pocketlm_runtime::Model;
use serde_json::Value;

// The converter's fixture helpers (stories260K paths), shared rather than copied.
#[path = "../../pocketlm-convert/tests/suite/common/mod.rs"]
mod common;
use common::{STORY, ZEROSHOT_ARC, convert};

/// Runs the CLI and parses its stdout, which must be exactly one JSON object.
fn cli_json(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_pocketlm"))
        .args(["-t", "1"])
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("{args:?}: stdout is not one JSON value ({e}): {stdout}"));
    assert!(v.is_object(), "{v}");
    v
}

#[test]
fn every_eval_subcommand_prints_one_json_object() {
    let (dir, f32_path) = convert(&ConvertOptions::with_weights(Encoding::F32));
    let (_q4_dir, q4_path) = convert(&ConvertOptions::with_weights(Encoding::Q4 {
        group: 32,
        asymmetric: true,
    }));
    let text = dir.path().join("story.txt");
    std::fs::write(&text, STORY).unwrap();
    let arc = dir.path().join("arc.jsonl");
    std::fs::write(&arc, ZEROSHOT_ARC).unwrap();
    let (m, b, t) = (
        q4_path.to_str().unwrap(),
        f32_path.to_str().unwrap(),
        text.to_str().unwrap(),
    );

    let ppl = cli_json(&["eval", "ppl", m, "--text", t, "--ctx", "64", "--json"]);
    assert!(ppl["ppl"].as_f64().unwrap() > 1.0);
    let kld = cli_json(&[
        "eval", "kld", m, "--base", b, "--text", t, "--ctx", "64", "--json",
    ]);
    assert!(kld["kld"].as_f64().unwrap() > 0.0);
    assert!(kld["top1_agreement"].as_f64().unwrap() <= 1.0);
    let (x, y) = (kld["ppl"].as_f64().unwrap(), ppl["ppl"].as_f64().unwrap());
    assert!((x - y).abs() < 1e-9 * y, "kld ppl {x} vs ppl {y}");
    let zs = cli_json(&[
        "eval",
        "zeroshot",
        m,
        "--task",
        "arc-easy",
        arc.to_str().unwrap(),
        "--limit",
        "2",
        "--json",
    ]);
    assert_eq!(zs["examples"], 2);
    assert!(zs["accuracy"].is_number() && zs["accuracy_norm"].is_number());
    let report = cli_json(&[
        "eval", "report", m, "--base", b, "--text", t, "--ctx", "64", "--chunks", "2", "--json",
    ]);
    assert!(report["kld"].as_f64().unwrap() > 0.0);
    assert_eq!(
        report["parameters"].as_u64().unwrap(),
        Model::open(&q4_path).unwrap().config().parameter_count()
    );
}

#[test]
fn the_cli_serves_a_lower_rank_on_request() {
    let (_dir, path) = convert(&ConvertOptions {
        lowrank: Some(LowRank {
            method: LowRankMethod::Svd,
            target: RankTarget::Rank(32),
            allocation: RankAllocation::Uniform,
        }),
        ..ConvertOptions::with_weights(Encoding::F32)
    });
    // FLOPs per token `inspect` reports, with `env` set and `extra` global flags.
    let flops = |env: &[(&str, &str)], extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_pocketlm"))
            .envs(env.iter().copied())
            .args(extra)
            .args(["inspect", "--json"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["flops_per_token"].as_u64().unwrap()
    };
    let (full, half) = (flops(&[], &[]), flops(&[], &["--low-rank-percent", "50"]));
    assert!(half < full, "{half} vs {full}");
    // The environment variable is the flag's default; the flag wins over it.
    let env = [("POCKETLM_LOW_RANK_PERCENT", "50")];
    assert_eq!(flops(&env, &[]), half);
    assert_eq!(flops(&env, &["--low-rank-percent", "100"]), full);
    let rejected = std::process::Command::new(env!("CARGO_BIN_EXE_pocketlm"))
        .args(["--low-rank-percent", "0", "inspect"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!rejected.status.success());
}

/// Runs `pocketlm chat` with `input` on stdin; returns stdout and the JSON lines on stderr.
fn chat(args: &[&str], input: &str) -> (String, Vec<Value>) {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_pocketlm"))
        .args(["-t", "1", "chat"])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(out.status.success(), "{args:?} failed: {stderr}");
    let lines = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    (String::from_utf8(out.stdout).unwrap(), lines)
}

#[test]
fn chat_from_a_pipe_reuses_turns_reports_them_and_saves_the_session() {
    let (dir, plm) = convert(&ConvertOptions::with_weights(Encoding::F32));
    let m = plm.to_str().unwrap();
    let saved = dir.path().join("chat.session");
    let s = saved.to_str().unwrap();
    let input = "Tell me about a cat.\nWhat did the cat eat?\nWhere did it go?\n";
    let args = [
        "--temp",
        "0",
        "-n",
        "12",
        "--stats-json",
        "--system",
        "Stories.",
    ];
    let (stdout, turns) = chat(&[&[m][..], &args, &["--save-session", s]].concat(), input);
    assert_eq!(
        stdout.lines().count(),
        3,
        "one reply line per input line: {stdout}"
    );
    assert_eq!(turns.len(), 3);
    for (i, t) in turns.iter().enumerate() {
        assert_eq!(t["turn"], i + 1);
        for key in [
            "prompt_tokens",
            "ttft_ms",
            "decode_tokens_per_s",
            "stop_reason",
        ] {
            assert!(!t[key].is_null(), "{key} missing: {t}");
        }
    }
    assert_eq!(turns[0]["reused_tokens"], 0);
    for t in &turns[1..] {
        let (reused, prompt) = (t["reused_tokens"].as_u64(), t["prompt_tokens"].as_u64());
        assert!(
            reused.unwrap() * 2 > prompt.unwrap(),
            "most of the prompt is reused: {t}"
        );
    }

    // Without reuse every turn computes the whole conversation, and says so.
    let (_, fresh) = chat(&[&[m][..], &args, &["--no-prefix-reuse"]].concat(), input);
    assert!(fresh.iter().all(|t| t["reused_tokens"] == 0), "{fresh:?}");
    assert_eq!(fresh[2]["prompt_tokens"], turns[2]["prompt_tokens"]);

    // A restored session goes on from the saved conversation: its first turn reuses it all.
    let (_, resumed) = chat(
        &[
            m,
            "--temp",
            "0",
            "-n",
            "4",
            "--stats-json",
            "--load-session",
            s,
        ],
        "And then?\n",
    );
    assert_eq!(resumed[0]["event"], "restore");
    assert_eq!(resumed[0]["messages"], 7, "system + 3 user + 3 assistant");
    let restored_tokens = resumed[0]["tokens"].as_u64().unwrap();
    assert!(resumed[1]["reused_tokens"].as_u64().unwrap() + 8 >= restored_tokens);

    // A session file from another model is refused by name.
    let (_q_dir, other) = convert(&ConvertOptions::with_weights(Encoding::F16));
    let out = Command::new(env!("CARGO_BIN_EXE_pocketlm"))
        .args(["chat", other.to_str().unwrap(), "--load-session", s])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another model"), "{err}");
}

#[test]
fn cpu_masks_pin_or_are_refused_by_name() {
    let (_dir, plm) = convert(&ConvertOptions::with_weights(Encoding::F32));
    let run = |mask: &str| {
        Command::new(env!("CARGO_BIN_EXE_pocketlm"))
            .args([
                "--cpu-mask",
                mask,
                "run",
                plm.to_str().unwrap(),
                "-p",
                "Once",
                "-n",
                "4",
            ])
            .output()
            .unwrap()
    };
    let ok = run("0x1");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stderr).contains("threads 1"));
    let bad = run("0-");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("'0-'"));
}

#[test]
fn run_with_a_schema_prints_only_matching_json_or_fails() {
    let (dir, plm) = convert(&ConvertOptions::with_weights(Encoding::F32));
    let schema = dir.path().join("schema.json");
    std::fs::write(
        &schema,
        r#"{"type":"object","properties":{"name":{"type":"string","maxLength":10},"age":{"type":"integer","minimum":0,"maximum":120}},"required":["name","age"],"additionalProperties":false}"#,
    )
    .unwrap();
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_pocketlm"))
            .args([
                "-t",
                "1",
                "run",
                plm.to_str().unwrap(),
                "-p",
                "Once upon a time",
            ])
            .args(["--temp", "0", "--json-schema", schema.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run(&["-n", "100"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let value: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        value["age"].is_i64() && value["name"].is_string(),
        "{value}"
    );
    // Too few tokens: the output is not valid JSON, and the command says so and fails.
    let out = run(&["-n", "3"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cut short"));
    // A grammar that does not compile is refused before generation.
    let grammar = dir.path().join("bad.gbnf");
    std::fs::write(&grammar, "root ::= (").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pocketlm"))
        .args(["run", plm.to_str().unwrap(), "-p", "Hi", "--grammar"])
        .arg(&grammar)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid GBNF grammar"));
}

/// The converter refuses options by `ConvertOptions` field; the CLI says it with the flags
/// the user typed (and nothing is written).
#[test]
fn convert_refusals_name_the_flags() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.plm");
    let fixture = common::fixture("hf");
    let calib = common::fixture("calib.txt");
    let refusal = |flags: &[&str]| -> String {
        let run = Command::new(env!("CARGO_BIN_EXE_pocketlm"))
            .args(["-t", "1", "convert"])
            .arg(&fixture)
            .arg("-o")
            .arg(&out)
            .arg("--calib")
            .arg(&calib)
            .args(flags)
            .output()
            .unwrap();
        assert!(!run.status.success(), "{flags:?} was accepted");
        String::from_utf8(run.stderr).unwrap()
    };
    let err = refusal(&["--weights", "f16", "--residual", "q4/g32"]);
    assert!(
        err.contains("--residual does not work with --weights f16"),
        "{err}"
    );
    let err = refusal(&["--weights", "q4+4:8"]);
    assert!(
        err.contains("--weights q4/g32 --prune METHOD --nm"),
        "{err}"
    );
    let err = refusal(&[
        "--weights",
        "q3",
        "--recover",
        "blockwise",
        "--recover-codes",
    ]);
    assert!(
        err.contains("--recover-codes applies to distillation"),
        "{err}"
    );
    let err = refusal(&[
        "--lowrank",
        "svd",
        "--ratio",
        "0.2",
        "--rank-alloc",
        "global",
        "--prune-channels",
        "0.25",
    ]);
    assert!(
        err.contains("--rank-alloc global does not combine with --prune-channels"),
        "{err}"
    );
    let err = refusal(&["--rotate", "--lowrank", "svd", "--ratio", "0.2"]);
    assert!(
        err.contains("--rotate does not work with --lowrank"),
        "{err}"
    );
    // Distillation works on rotated files; block-wise recovery does not, preset or not.
    let err = refusal(&["--preset", "q4", "--recover", "blockwise"]);
    assert!(
        err.contains("--rotate does not work with --recover blockwise"),
        "{err}"
    );
    // A preset is a whole recipe: recipe flags beside it are refused, q2 says why.
    let err = refusal(&["--preset", "q4", "--weights", "q8"]);
    assert!(
        err.contains("--preset") && err.contains("--weights"),
        "{err}"
    );
    let err = refusal(&["--preset", "q2"]);
    assert!(err.contains("no 2-bit preset yet"), "{err}");
    assert!(!out.exists());
}

/// `--preset q4` writes the rotated, calibrated 4-bit recipe and `inspect` names it.
#[test]
fn convert_preset_records_itself_and_inspect_shows_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("p.plm");
    let run = Command::new(env!("CARGO_BIN_EXE_pocketlm"))
        .args(["-t", "1", "convert"])
        .arg(common::fixture("hf"))
        .arg("-o")
        .arg(&out)
        .arg("--calib")
        .arg(common::fixture("calib.txt"))
        .args([
            "--preset",
            "q4",
            "--calib-samples",
            "8",
            "--calib-len",
            "64",
        ])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let info = Command::new(env!("CARGO_BIN_EXE_pocketlm"))
        .arg("inspect")
        .arg(&out)
        .output()
        .unwrap();
    let text = String::from_utf8(info.stdout).unwrap();
    assert!(text.contains("preset            q4"), "{text}");
    assert!(text.contains("rotated inputs"), "{text}");
    let json = cli_json(&["inspect", out.to_str().unwrap(), "--json"]);
    assert_eq!(json["recipe"]["method"], "gptq");
    assert_eq!(json["recipe"]["weights"], "q4/g32");
}

#[test]
fn bench_threads_sweep_prints_one_result_per_thread_count() {
    let (_dir, path) = convert(&ConvertOptions::with_weights(Encoding::F32));
    let out = Command::new(env!("CARGO_BIN_EXE_pocketlm"))
        .args([
            "bench",
            path.to_str().unwrap(),
            "-p",
            "8",
            "-n",
            "4",
            "-r",
            "1",
        ])
        .args(["--threads-sweep", "1,2", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = rows.as_array().expect("one JSON array");
    let threads: Vec<u64> = rows
        .iter()
        .map(|r| r["threads"].as_u64().unwrap())
        .collect();
    assert_eq!(threads, [1, 2]);
    for r in rows {
        assert!(r["decode_tokens_per_s"].as_f64().unwrap() > 0.0, "{r}");
        assert_eq!(r["prompt_tokens"], 8);
    }

    let zero = Command::new(env!("CARGO_BIN_EXE_pocketlm"))
        .args(["bench", path.to_str().unwrap(), "--threads-sweep", "0"])
        .output()
        .unwrap();
    assert!(!zero.status.success());
    assert!(String::from_utf8_lossy(&zero.stderr).contains("thread counts start at 1"));
}

#[test]
fn a_closed_output_pipe_ends_the_command_quietly() {
    // `pocketlm inspect --tensors | head -1`: the reader goes away before the command has
    // written; the command must stop without a panic message or backtrace.
    let (_dir, plm) = convert(&ConvertOptions::with_weights(Encoding::F32));
    let mut child = Command::new(env!("CARGO_BIN_EXE_pocketlm"))
        .args(["-t", "1", "inspect", "--tensors", plm.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        out.status.success() || out.status.code() == Some(141),
        "{:?}: {stderr}",
        out.status
    );
}

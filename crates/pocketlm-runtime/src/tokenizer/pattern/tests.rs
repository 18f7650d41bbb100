use super::*;

fn pieces<'t>(pattern: &str, text: &'t str) -> Vec<&'t str> {
    Pattern::new(pattern)
        .unwrap()
        .find_iter(text)
        .into_iter()
        .map(|(s, e)| &text[s..e])
        .collect()
}

const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

#[test]
fn gpt2_split() {
    assert_eq!(
        pieces(GPT2, "Hello world's  end 123!!\n\n x"),
        [
            "Hello", " world", "'s", " ", " end", " 123", "!!", "\n\n", " x"
        ]
    );
}

#[test]
fn llama3_split() {
    assert_eq!(
        pieces(LLAMA3, "I'LL pay 12345 dollars.\n\n  Ok"),
        [
            "I", "'LL", " pay", " ", "123", "45", " dollars", ".\n\n", " ", " Ok"
        ]
    );
    // (?i:'s) also matches the long s, as Unicode simple case folding says.
    assert_eq!(pieces(LLAMA3, "it'ſ IT'S"), ["it", "'ſ", " IT", "'S"]);
}

#[test]
fn quantifiers_and_lookahead() {
    assert_eq!(pieces(r"a{2,3}", "aaaaaaa"), ["aaa", "aaa"]);
    assert_eq!(pieces(r"a+?", "aaa"), ["a", "a", "a"]);
    assert_eq!(pieces(r"(?:ab)+c", "ababcabc"), ["ababc", "abc"]);
    assert_eq!(pieces(r"\s+(?!\S)", "a   b"), ["  "]);
    assert_eq!(pieces(r"x(?=y)", "xyxz"), ["x"]);
    assert_eq!(pieces(r"a++a", "aaa"), Vec::<&str>::new());
    assert_eq!(pieces(r"(?:a|ab)(?:c|bcd)", "abcd"), ["abcd"]);
    assert_eq!(pieces(r"[a-c-]+", "xa-bq"), ["a-b"]);
    assert_eq!(pieces(r"\x41\u{42}[\x{43}]", "ABC"), ["ABC"]);
    assert_eq!(pieces(r"(?i)ab|c", "AB c C"), ["AB", "c", "C"]);
    assert_eq!(pieces(r"(?i:a)b", "Ab AB"), ["Ab"]);
    assert_eq!(pieces(r"x{a", "x{a"), ["x{a"]);
    assert_eq!(pieces(r"^a|b$", "aab"), ["a", "b"]);
}

#[test]
fn refusals_name_the_construct() {
    for (pattern, needle) in [
        (r"(?<=a)b", "lookbehind"),
        (r"\p{Han}", "\\p{Han}"),
        (r"\bword", "\\b"),
        (r"(a", "unclosed"),
        (r"a)", "unbalanced"),
        (r"*a", "quantifier"),
        (r"[[:alpha:]]", "POSIX"),
    ] {
        let error = Pattern::new(pattern).unwrap_err().to_string();
        assert!(error.contains(needle), "{pattern}: {error}");
    }
}

#[test]
fn deep_patterns_fail_instead_of_overflowing() {
    // A repeated group nests one level per iteration: long runs stop matching.
    let text = "ab".repeat(50_000);
    let matches = pieces(r"(?:ab)+", &text);
    assert!(
        matches.iter().all(|m| m.len() < 2 * MAX_DEPTH),
        "{}",
        matches.len()
    );
    let nested = format!("{}a{}", "(".repeat(100), ")".repeat(100));
    assert!(
        Pattern::new(&nested)
            .unwrap_err()
            .to_string()
            .contains("nested")
    );
    let classes = format!("{}a{}", "[".repeat(100), "]".repeat(100));
    assert!(Pattern::new(&classes).is_err());
}

#[test]
fn hostile_patterns_stop() {
    // Exponential backtracking is cut off by the step budget instead of hanging.
    let text = "a".repeat(64);
    assert!(pieces(r"(?:a|a)*(?:a|a)*b", &text).is_empty());
}

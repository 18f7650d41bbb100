/// A checkpoint that claims a family but lacks its tensors, and an unknown family, fail
/// with errors naming what is wrong.
#[test]
fn missing_family_tensors_and_unknown_families_are_named() {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(family_dir("qwen3")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    let config_path = dir.path().join("config.json");
    let config = std::fs::read_to_string(&config_path).unwrap();
    // Qwen3's tensors under Gemma 3's name: no post-norms.
    std::fs::write(&config_path, config.replace("\"qwen3\"", "\"gemma3_text\"")).unwrap();
    let err = import::open(dir.path()).err().unwrap().to_string();
    assert!(
        err.contains("missing tensor 'blk.0.post_attention_norm.weight'"),
        "{err}"
    );
    std::fs::write(
        &config_path,
        config
            .replace("\"qwen3\"", "\"olmo2\"")
            .replace("Qwen3ForCausalLM", "Olmo2ForCausalLM"),
    )
    .unwrap();
    let err = import::open(dir.path()).err().unwrap().to_string();
    assert!(
        err.contains("unsupported architecture 'Olmo2ForCausalLM'") && err.contains("gemma3"),
        "{err}"
    );
}

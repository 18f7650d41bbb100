//! `pocketlm inspect`: what a .plm file holds.

use crate::args::{InspectArgs, JsonOutput};
use crate::commands::CliResult;
use crate::model_options::open_model;

pub fn execute(args: InspectArgs) -> CliResult {
    let InspectArgs {
        model: path,
        tensors: list_tensors,
        output: JsonOutput { json },
    } = args;
    let model = open_model(&path)?;
    let file = model.file();
    let config = model.config();
    let params: u64 = file
        .tensors()
        .iter()
        .filter(|t| !pocketlm_format::config::names::is_residual(&t.name))
        .map(|t| t.shape.iter().product::<usize>() as u64)
        .sum();
    let tensor_bytes: u64 = file.tensors().iter().map(|t| t.length).sum();
    let bits_per_weight = tensor_bytes as f64 * 8.0 / params.max(1) as f64;
    let mut encodings = std::collections::BTreeMap::<&str, (usize, u64)>::new();
    for t in file.tensors() {
        let e = encodings.entry(t.encoding.name()).or_default();
        e.0 += 1;
        e.1 += t.shape.iter().product::<usize>() as u64;
    }
    let flops = model.flops_per_token(0);
    if json {
        let tensors: Vec<_> = file
            .tensors()
            .iter()
            .map(|t| serde_json::json!({"name": t.name, "shape": t.shape, "encoding": t.encoding.name(), "bytes": t.length}))
            .collect();
        let out = serde_json::json!({
            "architecture": config.architecture.name(),
            "config": config,
            "parameters": params,
            "file_bytes": file.file_size(),
            "tensor_bytes": tensor_bytes,
            "bits_per_weight": bits_per_weight,
            "flops_per_token": flops,
            "recipe": file.metadata().get("recipe"),
            "tensors": tensors,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("file              {}", path.display());
    println!("architecture      {}", config.architecture.name());
    println!(
        "shape             {} layers, hidden {}, ffn {}, heads {} (kv {}), head dim {}, vocab {}",
        config.num_layers,
        config.hidden_size,
        config.intermediate_size,
        config.num_heads,
        config.num_kv_heads,
        config.head_dim,
        config.vocab_size
    );
    println!("context           {}", config.max_position_embeddings);
    println!(
        "parameters        {} ({:.2} M)",
        params,
        params as f64 / 1e6
    );
    println!(
        "file size         {} bytes ({:.2} MB)",
        file.file_size(),
        file.file_size() as f64 / 1e6
    );
    println!("bits per weight   {bits_per_weight:.3}");
    println!(
        "FLOPs per token   {:.3} G (at position 0; +{} per position of context)",
        flops as f64 / 1e9,
        2 * 2 * config.num_layers * config.q_dim()
    );
    for (name, (count, n)) in &encodings {
        println!("encoding {name:<8} {count} tensors, {n} weights");
    }
    if let Some(preset) = file
        .metadata()
        .pointer("/recipe/preset")
        .and_then(|p| p.as_str())
    {
        println!("preset            {preset}");
    }
    if let Some(incoherence) = config.incoherence {
        println!(
            "rotated inputs    randomized block Hadamard (seed {:#x}): the runtime rotates \
             every block matrix's input",
            incoherence.seed
        );
    }
    if let Some(recipe) = file.metadata().get("recipe") {
        println!("recipe            {recipe}");
    }
    if list_tensors {
        for t in file.tensors() {
            println!(
                "  {:<32} {:<14} {:<5} {:>10} bytes",
                t.name,
                format!("{:?}", t.shape),
                t.encoding.name(),
                t.length
            );
        }
    }
    Ok(())
}

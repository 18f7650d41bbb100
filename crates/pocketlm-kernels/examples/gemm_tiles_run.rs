//! Runs one quantized product `reps` times on one thread, for counting a tile kernel's
//! instructions under qemu (`scripts/count-arm-instructions.sh` counts whole models; this
//! isolates the kernel): the count of `reps = 2` minus that of `reps = 1` is one product.
//!
//! `gemm_tiles_run PATH ENCODING ROWS COLS TOKENS REPS`, e.g.
//! `QEMU_CPU=cortex-a76 qemu-aarch64 -plugin libinsncount.so gemm_tiles_run dotprod q4/g32 1536 576 64 2`.

use pocketlm_format::Encoding;
use pocketlm_kernels::{KernelPath, quant};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [path, encoding, rows, cols, tokens, reps] = args.as_slice() else {
        eprintln!("usage: gemm_tiles_run PATH ENCODING ROWS COLS TOKENS REPS");
        std::process::exit(2);
    };
    let path = KernelPath::parse(path).expect("kernel path");
    assert!(path.is_supported(), "{} is not supported here", path.name());
    let encoding: Encoding = encoding.parse().expect("encoding such as q4/g32");
    let number = |s: &String| s.parse::<usize>().expect("a number");
    let (rows, cols, tokens, reps) = (number(rows), number(cols), number(tokens), number(reps));
    let w: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let x: Vec<f32> = (0..tokens * cols)
        .map(|i| ((i * 104_729) % 997) as f32 / 498.0 - 1.0)
        .collect();
    let bytes = quant::quantize_rtn(&w, rows, cols, encoding).expect("quantize");
    let layout = encoding.quant_layout(&[rows, cols]).expect("layout");
    let m = quant::QuantMatrix::from_parts(encoding, &layout, &bytes).expect("matrix");
    let acts = quant::QuantizedActivations::quantize_with(path, &x, tokens, cols);
    let mut out = vec![vec![0.0f32; rows]; tokens];
    for _ in 0..reps {
        let mut rows_out: Vec<&mut [f32]> = out.iter_mut().map(|o| o.as_mut_slice()).collect();
        quant::gemm_tiles(path, &m, &acts, 0..m.tiles(), &mut rows_out);
    }
    // Printed so the products are not optimized away.
    println!("{}", out.iter().flatten().map(|&v| v as f64).sum::<f64>());
}

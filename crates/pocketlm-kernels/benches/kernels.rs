//! Kernel throughput: one weight matrix of SmolLM2-135M's shapes (576 → 1536, a low-rank
//! `U` factor 320 → 1536, and the 49152-row output layer) times one token (decode) and 128
//! tokens (prefill), per encoding and every kernel path this CPU supports.
//! `cargo bench -p pocketlm-kernels --bench kernels [--features faer]`; thread counts with
//! RAYON_NUM_THREADS.

use criterion::{Bencher, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use half::f16;
use pocketlm_format::Encoding;
use pocketlm_kernels::{self as kernels, KernelPath, MatRef, WeightData, quant, sparse};

fn weights(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect()
}

/// Times `out = x · wᵀ` on a thread of `pool`, as the runtime runs inside its pool: called
/// from outside, each product would also pay the pool's cold entry (at 2 threads that made a
/// 1536×576 q4 product take 24 µs instead of 12).
fn iter_on_pool(
    pool: &rayon::ThreadPool,
    b: &mut Bencher<'_>,
    path: KernelPath,
    x: &[f32],
    tokens: usize,
    w: MatRef<'_>,
    out: &mut [f32],
) {
    pool.install(|| b.iter(|| kernels::matmul_with(path, x, tokens, w, out)))
}

fn bench_matmul(c: &mut Criterion) {
    let pool = rayon::ThreadPoolBuilder::new().build().unwrap();
    let paths: Vec<KernelPath> = KernelPath::ALL
        .into_iter()
        .filter(|p| p.is_supported())
        .collect();
    for &(rows, cols) in &[(1536usize, 576usize), (1536, 320), (49152, 576)] {
        let w = weights(rows * cols);
        let w16: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
        let encodings = [
            Encoding::Q4 {
                group: 32,
                asymmetric: false,
            },
            Encoding::Q4 {
                group: 32,
                asymmetric: true,
            },
            Encoding::Q8 { group: 32 },
            Encoding::Q3 { group: 64 },
        ];
        // 2:4: drop the two smaller-magnitude weights of every run of four.
        let mut pruned = w.clone();
        for run in pruned.chunks_exact_mut(4) {
            let mut order = [0, 1, 2, 3];
            order.sort_by(|&a, &b| run[a].abs().total_cmp(&run[b].abs()));
            run[order[0]] = 0.0;
            run[order[1]] = 0.0;
        }
        let sparse_bytes = sparse::encode(&pruned, rows, cols).unwrap();
        let sparse_layout = pocketlm_format::Sparse24Layout::new(&[rows, cols]).unwrap();
        let mut quantized: Vec<(Encoding, Vec<u8>)> = encodings
            .iter()
            .map(|&e| (e, quant::quantize_rtn(&w, rows, cols, e).unwrap()))
            .collect();
        // The sparse quantized encodings hold the 2:4-pruned weights.
        for e in [
            Encoding::Q4Sparse48 { group: 32 },
            Encoding::Q8Sparse48 { group: 32 },
        ] {
            quantized.push((e, quant::quantize_rtn(&pruned, rows, cols, e).unwrap()));
        }
        // The masked (unstructured) encodings hold the same 50% of the weights, pruned as 2:4
        // (any pattern costs the kernels the same: they walk every mask).
        for base in [
            Encoding::Q4 {
                group: 32,
                asymmetric: false,
            },
            Encoding::Q8 { group: 32 },
        ] {
            let e = base.masked_storage(&pruned, rows, cols).unwrap();
            quantized.push((e, quant::quantize_rtn(&pruned, rows, cols, e).unwrap()));
        }
        for tokens in [1usize, 128] {
            if rows > 2000 && tokens > 1 {
                continue; // the output layer is only ever applied to one token per step
            }
            let mut group = c.benchmark_group(format!("matmul_{rows}x{cols}_t{tokens}"));
            group.sample_size(10);
            group.throughput(Throughput::Elements((rows * cols * tokens) as u64));
            let x = weights(tokens * cols);
            let mut out = vec![0.0f32; tokens * rows];
            for &path in &paths {
                if path == KernelPath::Scalar && tokens > 1 {
                    continue;
                }
                // The float kernels are the same on the integer extensions of a path.
                if path.float_path() == path {
                    // f32 products of 8+ tokens go to faer's GEMM with the `faer` feature
                    // (the converter's build) and to the row kernels without it (the app's).
                    let f32m = MatRef::new(WeightData::F32(&w), rows, cols).unwrap();
                    group.bench_function(BenchmarkId::new("f32", path.name()), |b| {
                        iter_on_pool(&pool, b, path, &x, tokens, f32m, &mut out)
                    });
                    let f16m = MatRef::new(WeightData::F16(&w16), rows, cols).unwrap();
                    group.bench_function(BenchmarkId::new("f16", path.name()), |b| {
                        iter_on_pool(&pool, b, path, &x, tokens, f16m, &mut out)
                    });
                    let sm =
                        sparse::Sparse24Matrix::from_parts(&sparse_layout, &sparse_bytes).unwrap();
                    let sm = MatRef::new(WeightData::Sparse24(sm), rows, cols).unwrap();
                    group.bench_function(BenchmarkId::new("f16+2:4", path.name()), |b| {
                        iter_on_pool(&pool, b, path, &x, tokens, sm, &mut out)
                    });
                }
                for (e, bytes) in &quantized {
                    let layout = e.quant_layout(&[rows, cols]).unwrap();
                    let m = quant::QuantMatrix::from_parts(*e, &layout, bytes).unwrap();
                    let mat = MatRef::new(WeightData::Quant(m), rows, cols).unwrap();
                    group.bench_function(BenchmarkId::new(e.describe(), path.name()), |b| {
                        iter_on_pool(&pool, b, path, &x, tokens, mat, &mut out)
                    });
                }
            }
            group.finish();
        }
    }
}

criterion_group!(benches, bench_matmul);
criterion_main!(benches);

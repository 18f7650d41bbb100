// Shared helpers for the fuzz targets (included with `#[path]`/`mod common`).
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

/// Lets libFuzzer report a stack overflow like any other crash (the input saved under
/// `artifacts/` and printed in base64) instead of dying silently with SIGSEGV: its SIGSEGV
/// handler gets an alternate signal stack to run on, since the overflowed one has no room.
pub fn report_stack_overflows() {
    const ALT_STACK_BYTES: usize = 1 << 20;
    let stack: &'static mut [u8] = Box::leak(vec![0u8; ALT_STACK_BYTES].into_boxed_slice());
    // SAFETY: the alternate stack is leaked, so it outlives every signal; the handler
    // libFuzzer installed is read back and re-installed unchanged but for SA_ONSTACK.
    unsafe {
        let alt = libc::stack_t {
            ss_sp: stack.as_mut_ptr().cast(),
            ss_flags: 0,
            ss_size: ALT_STACK_BYTES,
        };
        assert_eq!(libc::sigaltstack(&alt, std::ptr::null_mut()), 0);
        let mut action: libc::sigaction = std::mem::zeroed();
        assert_eq!(
            libc::sigaction(libc::SIGSEGV, std::ptr::null(), &mut action),
            0
        );
        action.sa_flags |= libc::SA_ONSTACK;
        assert_eq!(
            libc::sigaction(libc::SIGSEGV, &action, std::ptr::null_mut()),
            0
        );
    }
}

/// A scratch directory private to this fuzzing process, on tmpfs when there is one, so
/// targets exercise the real file + mmap path without wearing a disk.
pub fn scratch_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("pocketlm-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        dir
    })
}

/// Splits `data` at the first `sep` byte: (before, after). No separator: (all, empty).
pub fn split_at_byte(data: &[u8], sep: u8) -> (&[u8], &[u8]) {
    match data.iter().position(|&b| b == sep) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[]),
    }
}

/// The stories260K tokenizer (SentencePiece-style BPE with byte fallback).
pub const STORIES_TOKENIZER_JSON: &str =
    include_str!("../../tests/fixtures/stories260k/hf/tokenizer.json");

/// Recomputes the metadata, table and header CRCs of a .plm image in place (where the header's
/// ranges are in bounds), so mutations reach the table, metadata and model validation instead
/// of stopping at a checksum mismatch.
pub fn reseal(b: &mut [u8]) {
    if b.len() < 128 {
        return;
    }
    let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    for (off, len, crc) in [(40, 48, 56), (64, 72, 80)] {
        let (start, n) = (u64_at(b, off), u64_at(b, len));
        if let Some(end) = start.checked_add(n).filter(|&e| e <= b.len() as u64) {
            let sum = crc32fast::hash(&b[start as usize..end as usize]);
            b[crc..crc + 4].copy_from_slice(&sum.to_le_bytes());
        }
    }
    let sum = crc32fast::hash(&b[..124]);
    b[124..128].copy_from_slice(&sum.to_le_bytes());
}

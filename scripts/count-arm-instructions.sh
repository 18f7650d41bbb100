#!/usr/bin/env bash
# ARM evidence without ARM hardware (issue 30, item 4): counts the guest instructions that
# pocketlm and llama.cpp execute under qemu-aarch64 for SmolLM2-135M at 4 bits, per prefill
# token (64-token prefill) and per decode token (16 decode tokens), one thread, on the qemu
# CPU models cortex-a76 (NEON + dotprod) and max (dotprod + i8mm), and prints a Markdown table
# with the ratios, plus the weight bytes each decode token reads from either file.
#
#   bash scripts/count-arm-instructions.sh            # everything (first run ~30 min on 2 cores)
#   ARM_COUNT_DIR=DIR bash scripts/count-arm-instructions.sh   # cache elsewhere
#
# Not part of CI. Installs what it needs (Debian 12: the aarch64 cross toolchain and qemu-user
# as scripts/test-arm.sh does, g++ for aarch64, python3-venv) and caches every download and
# build under compare/arm-count/ (git-ignored):
# - qemu-plugin.h from Debian's qemu source package (apt-get source --download-only, through a
#   private apt configuration with deb-src lines; the system's sources are not touched), and a
#   small counting plugin built from the C source below with the host gcc;
# - llama.cpp from the PyPI sdist of llama-cpp-python (LLAMA_SDIST=path/to/sdist.tar.gz to use
#   a local copy), cross-built statically for aarch64 twice: -march=armv8.2-a+dotprod+fp16
#   (run on cortex-a76) and -march=armv8.6-a+dotprod+i8mm+fp16 (run on max); no SVE, as
#   pocketlm has no SVE kernels;
# - pocketlm for aarch64 (cargo +debian, CARGO_TARGET_DIR respected; default target/);
# - the model files, both made from models/SmolLM2-135M-Instruct.Q4_1.gguf: llama.cpp's Q4_0
#   (llama-quantize --allow-requantize; its tied token embedding / output head becomes Q8_0) and
#   pocketlm's `convert --weights q4/g32` (round to nearest, 4.5 bits per weight; the embedding
#   and tied head in q8/g32, pocketlm's default).
#
# Method: differential runs, so model load, llama.cpp's repacking, tokenizer setup and
# pocketlm's bandwidth probe cancel. Per prefill token = (count of the benchmark with two
# 64-token prefills - count with one) / 64; per decode token = (count of one 64-token prefill
# plus 16 decode tokens - count of the prefill alone) / 16. pocketlm: `pocketlm -t 1 bench
# -p 64 -n 0|16 -r 1|2 --json`; llama.cpp: `llama-bench -t 1 --no-warmup -p 64 -n 0 -r 1|2`
# and `-p 0 -n 0 -pg 64,16 -r 1`. Instructions are not time: qemu counts each guest
# instruction once, whatever its latency, and knows nothing of caches or memory bandwidth.
#
# PROFILE=1 also writes per-function counts of each differential (the top 15 functions) next
# to the table, for finding the loop that costs most.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
dir=${ARM_COUNT_DIR:-compare/arm-count}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
llama_version=0.3.36

# --- packages -------------------------------------------------------------------------------
sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
need=()
command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
command -v aarch64-linux-gnu-g++ >/dev/null || need+=(g++-aarch64-linux-gnu)
command -v gcc >/dev/null || need+=(gcc)
command -v xz >/dev/null || need+=(xz-utils)
python3 -c 'import ensurepip' 2>/dev/null || need+=(python3-venv)
[ -d /usr/lib/rustlib/aarch64-unknown-linux-gnu ] || need+=(rustc-web cargo-web libstd-rust-web-dev:arm64)
if [ ${#need[@]} -gt 0 ]; then
  $sudo dpkg --add-architecture arm64
  $sudo apt-get -o DPkg::Lock::Timeout=600 update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
    --no-install-recommends "${need[@]}" >/dev/null
fi
rustup toolchain list | grep -q '^debian' || rustup toolchain link debian /usr

# --- the counting plugin ----------------------------------------------------------------------
# qemu-plugin.h of the installed qemu's upstream version, from Debian's source package.
qemu_src_version=$(dpkg-query -W -f='${source:Version}' qemu-user)  # e.g. 1:7.2+dfsg-7+deb12u18
qemu_upstream=${qemu_src_version#*:}; qemu_upstream=${qemu_upstream%%-*}  # 7.2+dfsg
header_dir="$dir/qemu-$qemu_upstream"
if [ ! -s "$header_dir/qemu-plugin.h" ]; then
  apt_dir="$dir/apt"
  mkdir -p "$apt_dir/parts" "$apt_dir/lists/partial" "$apt_dir/cache" "$apt_dir/src"
  . /etc/os-release
  cat >"$apt_dir/parts/src.sources" <<EOF
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: $VERSION_CODENAME $VERSION_CODENAME-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian-security
Suites: $VERSION_CODENAME-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  apt_opts=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$apt_dir/parts"
    -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache" -o APT::Sandbox::User=root)
  apt-get "${apt_opts[@]}" update -qq
  # The installed version if the archive still has it, else the newest: both share the
  # upstream tarball (checked below), which is all that is used.
  (cd "$apt_dir/src" && { apt-get "${apt_opts[@]}" source -qq --download-only "qemu=$qemu_src_version" ||
    apt-get "${apt_opts[@]}" source -qq --download-only qemu; })
  orig=$(ls "$apt_dir"/src/qemu_*.orig.tar.xz)
  case "$orig" in
    *"qemu_${qemu_upstream}.orig.tar.xz") ;;
    *) echo "count-arm-instructions: the archive's qemu source ($orig) is not upstream $qemu_upstream" >&2; exit 1 ;;
  esac
  mkdir -p "$header_dir"
  tar -xJf "$orig" -C "$header_dir" --strip-components=3 --wildcards '*/include/qemu/qemu-plugin.h'
  rm -rf "$apt_dir/src"
fi
plugin="$dir/libinsncount.so"
cat >"$dir/insncount.c" <<'EOF'
/* Counts guest instructions executed (qemu-user TCG plugin, plugin API of qemu 7.2). Every
 * translated block gets an exec callback adding its instruction count to a counter of the
 * calling guest thread; at exit the per-thread counters are summed and written as
 * "insncount: total N threads T" to stderr, or to FILE with the argument out=FILE. With
 * profile=FILE it also writes one line per executed translation: start address (hex),
 * instructions, executions, symbol ("?" where the guest ELF has none). */
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <qemu-plugin.h>

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

struct counter { uint64_t n; struct counter *next; };
struct block { uint64_t vaddr, n_insns, execs; const char *sym; struct block *next; };

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct counter *counters; /* one per guest thread, never freed */
static __thread struct counter *mine;
static struct block *blocks;     /* profile: every translation */
static char *out_path, *profile_path;

static struct counter *my_counter(void)
{
    if (!mine) {
        mine = calloc(1, sizeof(*mine));
        pthread_mutex_lock(&lock);
        mine->next = counters;
        counters = mine;
        pthread_mutex_unlock(&lock);
    }
    return mine;
}

static void exec_count(unsigned int vcpu, void *udata)
{
    my_counter()->n += (uintptr_t)udata;
}

static void exec_profile(unsigned int vcpu, void *udata)
{
    struct block *b = udata;
    my_counter()->n += b->n_insns;
    __atomic_fetch_add(&b->execs, 1, __ATOMIC_RELAXED);
}

static void tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    size_t n = qemu_plugin_tb_n_insns(tb);
    if (!profile_path) {
        qemu_plugin_register_vcpu_tb_exec_cb(tb, exec_count, QEMU_PLUGIN_CB_NO_REGS,
                                             (void *)(uintptr_t)n);
        return;
    }
    struct block *b = calloc(1, sizeof(*b));
    b->vaddr = qemu_plugin_tb_vaddr(tb);
    b->n_insns = n;
    const char *sym = n ? qemu_plugin_insn_symbol(qemu_plugin_tb_get_insn(tb, 0)) : NULL;
    b->sym = sym ? sym : "?";
    pthread_mutex_lock(&lock);
    b->next = blocks;
    blocks = b;
    pthread_mutex_unlock(&lock);
    qemu_plugin_register_vcpu_tb_exec_cb(tb, exec_profile, QEMU_PLUGIN_CB_NO_REGS, b);
}

static void at_exit(qemu_plugin_id_t id, void *p)
{
    uint64_t total = 0;
    int threads = 0;
    pthread_mutex_lock(&lock);
    for (struct counter *c = counters; c; c = c->next) {
        total += c->n;
        threads++;
    }
    FILE *f = out_path ? fopen(out_path, "w") : stderr;
    if (f) {
        fprintf(f, "insncount: total %" PRIu64 " threads %d\n", total, threads);
        if (f != stderr) fclose(f);
    }
    if (profile_path && (f = fopen(profile_path, "w"))) {
        for (struct block *b = blocks; b; b = b->next)
            if (b->execs)
                fprintf(f, "%" PRIx64 " %" PRIu64 " %" PRIu64 " %s\n", b->vaddr, b->n_insns,
                        b->execs, b->sym);
        fclose(f);
    }
    pthread_mutex_unlock(&lock);
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,
                                           int argc, char **argv)
{
    for (int i = 0; i < argc; i++) {
        if (!strncmp(argv[i], "out=", 4)) {
            out_path = strdup(argv[i] + 4);
        } else if (!strncmp(argv[i], "profile=", 8)) {
            profile_path = strdup(argv[i] + 8);
        } else {
            fprintf(stderr, "insncount: unknown argument %s\n", argv[i]);
            return -1;
        }
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, tb_trans);
    qemu_plugin_register_atexit_cb(id, at_exit, NULL);
    return 0;
}
EOF
if [ ! -s "$plugin" ] || [ "$dir/insncount.c" -nt "$plugin" ]; then
  gcc -O2 -shared -fPIC -Wall -Wextra -Wno-unused-parameter -I"$header_dir" \
    -o "$plugin" "$dir/insncount.c"
fi

# --- llama.cpp for aarch64 ----------------------------------------------------------------
if ! command -v cmake >/dev/null || ! command -v ninja >/dev/null || [ ! -s "${LLAMA_SDIST:-$dir/llama_cpp_python-$llama_version.tar.gz}" ]; then
  [ -x "$dir/venv/bin/pip" ] || python3 -m venv "$dir/venv"
  "$dir/venv/bin/pip" install -q cmake ninja scikit-build-core
  export PATH="$dir/venv/bin:$PATH"
fi
sdist=${LLAMA_SDIST:-$dir/llama_cpp_python-$llama_version.tar.gz}
if [ ! -s "$sdist" ]; then
  "$dir/venv/bin/pip" download -q --no-deps --no-binary llama-cpp-python --no-build-isolation \
    -d "$dir" "llama-cpp-python==$llama_version"
fi
src="$dir/llama_cpp_python-$llama_version/vendor/llama.cpp"
[ -f "$src/CMakeLists.txt" ] || tar -xzf "$sdist" -C "$dir"
mkdir -p "$dir/bin"
build_llama() {  # name, -march value, targets...
  local name=$1 march=$2
  [ -x "$dir/bin/llama-bench-$name" ] && return 0
  # One build directory: the second configuration recompiles ggml-cpu only.
  cmake -S "$src" -B "$dir/build-llama" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64 \
    -DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc -DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++ \
    -DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH="$march" -DGGML_OPENMP=OFF -DBUILD_SHARED_LIBS=OFF \
    -DCMAKE_EXE_LINKER_FLAGS=-static -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >"$dir/cmake-$name.log"
  cmake --build "$dir/build-llama" -j"$(nproc)" --target "${@:3}" >"$dir/build-$name.log" 2>&1 ||
    { tail -n 30 "$dir/build-$name.log" >&2; exit 1; }
  for t in "${@:3}"; do
    [ "$t" = llama-bench ] && cp "$dir/build-llama/bin/llama-bench" "$dir/bin/llama-bench-$name"
    [ "$t" = llama-quantize ] && cp "$dir/build-llama/bin/llama-quantize" "$dir/bin/llama-quantize"
  done
  return 0
}
echo "== llama.cpp $llama_version (llama-cpp-python sdist) for aarch64" >&2
build_llama dotprod armv8.2-a+dotprod+fp16 llama-bench llama-quantize
build_llama i8mm armv8.6-a+dotprod+i8mm+fp16 llama-bench

# --- pocketlm for aarch64 and the model files ----------------------------------------------
echo "== pocketlm for aarch64" >&2
cargo +debian build --release --locked --quiet --target aarch64-unknown-linux-gnu -p pocketlm
pocketlm="${CARGO_TARGET_DIR:-target}/aarch64-unknown-linux-gnu/release/pocketlm"
case "$pocketlm" in /*) ;; *) pocketlm="$root/$pocketlm" ;; esac
bash scripts/fetch-models.sh >&2
source_gguf=models/SmolLM2-135M-Instruct.Q4_1.gguf
[ -s "$source_gguf" ] || { echo "count-arm-instructions: $source_gguf missing (offline?)" >&2; exit 1; }
gguf="$dir/smollm2-Q4_0.gguf"
plm="$dir/smollm2-q4.plm"
if [ ! -s "$gguf" ]; then
  qemu-aarch64 "$dir/bin/llama-quantize" --allow-requantize "$source_gguf" "$gguf.part" Q4_0 1 \
    >"$dir/quantize.log" 2>&1
  mv "$gguf.part" "$gguf"
fi
if ! qemu-aarch64 "$pocketlm" inspect "$plm" >/dev/null 2>&1; then
  qemu-aarch64 "$pocketlm" -t 1 convert "$source_gguf" -o "$plm" --weights q4/g32 >"$dir/convert.log" 2>&1
fi

# --- counting -----------------------------------------------------------------------------
results="$dir/results"
mkdir -p "$results"
count() {  # key, cpu, command...: prints the instruction count, cached by key and binary
  local key=$1 cpu=$2 stamp
  stamp=$(sha256sum "$3" "$plugin" | sha256sum | cut -c1-16)
  local out="$results/$key.$stamp"
  if [ ! -s "$out" ]; then
    local prof=""
    [ "${PROFILE:-0}" = 1 ] && prof=",profile=$out.profile"
    QEMU_CPU=$cpu qemu-aarch64 -plugin "$plugin,out=$out.part$prof" "${@:3}" >"$out.log" 2>&1 ||
      { tail -n 20 "$out.log" >&2; exit 1; }
    mv "$out.part" "$out"
  fi
  awk '{print $3}' "$out"
  [ "${PROFILE:-0}" = 1 ] && echo "$out.profile" >>"$results/profiles.txt"
  return 0
}
rows=()
for cpu in cortex-a76 max; do
  case $cpu in cortex-a76) lb="$dir/bin/llama-bench-dotprod" ;; max) lb="$dir/bin/llama-bench-i8mm" ;; esac
  echo "== counting on -cpu $cpu (6 runs of 10-60 s)" >&2
  pl=("$pocketlm" -t 1 bench "$plm" --json)
  ll=("$lb" -m "$gguf" -t 1 --no-warmup)
  p1=$(count "pocketlm-$cpu-p64r1" "$cpu" "${pl[@]}" -p 64 -n 0 -r 1)
  p2=$(count "pocketlm-$cpu-p64r2" "$cpu" "${pl[@]}" -p 64 -n 0 -r 2)
  pg=$(count "pocketlm-$cpu-p64n16" "$cpu" "${pl[@]}" -p 64 -n 16 -r 1)
  l1=$(count "llama-$cpu-p64r1" "$cpu" "${ll[@]}" -p 64 -n 0 -r 1)
  l2=$(count "llama-$cpu-p64r2" "$cpu" "${ll[@]}" -p 64 -n 0 -r 2)
  lg=$(count "llama-$cpu-pg64-16" "$cpu" "${ll[@]}" -p 0 -n 0 -pg 64,16 -r 1)
  rows+=("$cpu $p1 $p2 $pg $l1 $l2 $lg")
done
pocketlm_json=$(ls -t "$results"/pocketlm-max-p64n16.*.log | head -n 1)
if [ "${PROFILE:-0}" = 1 ]; then
  echo "== profiles (per-function instructions of each differential)" >&2
  python3 - "$results" <<'PY' >&2
import collections, glob, os, subprocess, sys
res = sys.argv[1]
def load(prefix):
    path = max(glob.glob(os.path.join(res, prefix + ".*.profile")), key=os.path.getmtime)
    c = collections.Counter()
    for line in open(path):
        _, n, e, s = line.rstrip("\n").split(" ", 3)
        c[s] += int(n) * int(e)
    return c
for engine, pairs in (("pocketlm", (("p64r2", "p64r1", 64, "prefill"), ("p64n16", "p64r1", 16, "decode"))),
                      ("llama", (("p64r2", "p64r1", 64, "prefill"), ("pg64-16", "p64r1", 16, "decode")))):
    for cpu in ("cortex-a76", "max"):
        for a, b, n, what in pairs:
            ca, cb = load(f"{engine}-{cpu}-{a}"), load(f"{engine}-{cpu}-{b}")
            d = collections.Counter({k: ca[k] - cb.get(k, 0) for k in ca})
            top = d.most_common(15)
            names = subprocess.run(["c++filt"], input="\n".join(k for k, _ in top),
                                   capture_output=True, text=True).stdout.split("\n")
            print(f"\n{engine} {cpu} per {what} token: {sum(d.values()) / n / 1e6:.2f} M")
            for (k, v), name in zip(top, names):
                print(f"  {v / n / 1e6:8.2f} M  {name[:110]}")
PY
fi

# --- table --------------------------------------------------------------------------------
python3 - "$gguf" "$pocketlm_json" "${rows[@]}" <<'PY'
import json, struct, sys
gguf, pocketlm_log, rows = sys.argv[1], sys.argv[2], sys.argv[3:]

def gguf_decode_bytes(path):
    """Weight bytes one decode token reads: every block matrix and norm, the output head (the
    tied token embedding, whole) and one embedding row."""
    sizes = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 8: (32, 34)}  # f32 f16 q4_0 q4_1 q8_0
    with open(path, "rb") as f:
        def u(fmt):
            return struct.unpack("<" + fmt, f.read(struct.calcsize("<" + fmt)))[0]
        def string():
            return f.read(u("Q")).decode()
        def value(t):
            scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
            if t in scalar:
                return u(scalar[t])
            if t == 8:
                return string()
            if t == 9:
                et, n = u("I"), u("Q")
                return [value(et) for _ in range(n)]
            raise ValueError(t)
        assert f.read(4) == b"GGUF" and u("I") == 3
        n_tensors, n_kv = u("Q"), u("Q")
        for _ in range(n_kv):
            string(); value(u("I"))
        tensors = {}
        for _ in range(n_tensors):
            name = string()
            dims = [u("Q") for _ in range(u("I"))]
            t = u("I"); u("Q")
            n = 1
            for d in dims:
                n *= d
            per, size = sizes[t]
            tensors[name] = (dims, n // per * size)
    total = sum(size for name, (dims, size) in tensors.items() if name != "token_embd.weight")
    dims, emb = tensors["token_embd.weight"]
    total += emb // dims[1]  # one row
    if "output.weight" not in tensors:
        total += emb  # tied: the head reads the whole embedding
    return total

plm_bytes = None
for line in open(pocketlm_log):
    if line.startswith("{"):
        plm_bytes = json.loads(line)["bytes_per_token"]
gguf_bytes = gguf_decode_bytes(gguf)

print("| CPU model | engine | instructions / prefill token | instructions / decode token |")
print("|---|---|---:|---:|")
verdicts = []
for line in rows:
    cpu, p1, p2, pg, l1, l2, lg = line.split()
    p1, p2, pg, l1, l2, lg = map(int, (p1, p2, pg, l1, l2, lg))
    pp, pd = (p2 - p1) / 64, (pg - p1) / 16
    lp, ld = (l2 - l1) / 64, (lg - l1) / 16
    print(f"| {cpu} | pocketlm q4/g32 | {pp / 1e6:.2f} M | {pd / 1e6:.2f} M |")
    print(f"| {cpu} | llama.cpp Q4_0 | {lp / 1e6:.2f} M | {ld / 1e6:.2f} M |")
    rp, rd = pp / lp, pd / ld
    print(f"| {cpu} | pocketlm / llama.cpp | **{rp:.2f}×** (target ≤ 0.70: {'met' if rp <= 0.7 else 'missed'}) "
          f"| **{rd:.2f}×** (target ≤ 1.00: {'met' if rd <= 1.0 else 'missed'}) |")
print()
print(f"Weight bytes read per decode token: pocketlm {plm_bytes} ({plm_bytes / 1e6:.2f} MB), "
      f"llama.cpp {gguf_bytes} ({gguf_bytes / 1e6:.2f} MB); ratio {plm_bytes / gguf_bytes:.4f}.")
PY

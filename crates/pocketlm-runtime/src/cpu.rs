//! Which cores to run on. Phones pair a few fast cores with slow ones (big.LITTLE); a
//! decode step runs at the pace of its slowest worker, so work placed on a little core costs
//! a large share of decode speed (30–40% in llama.cpp#6148). Linux and Android describe each
//! core in sysfs: `cpu_capacity` (relative speed, 1024 for the fastest) and
//! `cpufreq/cpuinfo_max_freq`. The default is one worker per performance core, each pinned to
//! its core when the cores differ.

use std::path::Path;

/// One online core as sysfs describes it.
#[derive(Clone, Debug, PartialEq)]
pub struct Core {
    pub id: usize,
    /// `cpu_capacity` (the scheduler's relative speed; 1024 = the fastest core).
    pub capacity: Option<u32>,
    /// `cpufreq/cpuinfo_max_freq` in kHz.
    pub max_freq_khz: Option<u64>,
}

/// The machine's online cores. Empty when sysfs says nothing (other systems, sandboxes).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CpuTopology {
    pub cores: Vec<Core>,
}

/// A core counts as a performance core when its speed is at least this fraction of the
/// fastest core's: prime and big cores of a phone (capacities ~1024 and ~700–900) pass,
/// little cores (~200–450) do not.
const PERFORMANCE_FRACTION: f64 = 0.6;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpuMaskError {
    #[error(
        "CPU mask '{0}' is empty or malformed (expected a hex mask such as 0xf0, or a list such as 0-3,6)"
    )]
    Syntax(String),
    #[error("CPU mask '{mask}' names core {core}, beyond the {limit} cores a mask may name")]
    TooLarge {
        mask: String,
        core: usize,
        limit: usize,
    },
}

/// Most cores a mask may name (a bound for hostile input, far above real machines).
const MAX_CORES: usize = 4096;

impl CpuTopology {
    /// Reads `/sys/devices/system/cpu`; empty where it is missing.
    pub fn detect() -> CpuTopology {
        CpuTopology::read(Path::new("/sys/devices/system/cpu"))
    }

    /// Reads a sysfs CPU directory (`online`, `cpuN/cpu_capacity`,
    /// `cpuN/cpufreq/cpuinfo_max_freq`). Unreadable or malformed entries count as absent.
    pub fn read(root: &Path) -> CpuTopology {
        let read = |rel: String| std::fs::read_to_string(root.join(rel)).ok();
        let Some(online) = read("online".into()).and_then(|s| parse_cpu_list(s.trim()).ok()) else {
            return CpuTopology::default();
        };
        let cores = online
            .into_iter()
            .map(|id| Core {
                id,
                capacity: read(format!("cpu{id}/cpu_capacity")).and_then(|s| s.trim().parse().ok()),
                max_freq_khz: read(format!("cpu{id}/cpufreq/cpuinfo_max_freq"))
                    .and_then(|s| s.trim().parse().ok()),
            })
            .collect();
        CpuTopology { cores }
    }

    /// Each core's speed relative to the fastest: from `cpu_capacity` when every core has
    /// one, else from the maximum frequency, else `None` (all cores taken as equal).
    fn speeds(&self) -> Option<Vec<f64>> {
        let from = |values: Vec<Option<u64>>| -> Option<Vec<f64>> {
            let values: Option<Vec<u64>> = values.into_iter().collect();
            let values = values?;
            let max = *values.iter().max()?;
            (max > 0).then(|| values.iter().map(|&v| v as f64 / max as f64).collect())
        };
        from(
            self.cores
                .iter()
                .map(|c| c.capacity.map(u64::from))
                .collect(),
        )
        .or_else(|| from(self.cores.iter().map(|c| c.max_freq_khz).collect()))
    }

    /// The performance cores (all cores when they are alike or sysfs does not say).
    pub fn performance_cores(&self) -> Vec<usize> {
        match self.speeds() {
            Some(speeds) => self
                .cores
                .iter()
                .zip(speeds)
                .filter(|(_, s)| *s >= PERFORMANCE_FRACTION)
                .map(|(c, _)| c.id)
                .collect(),
            None => self.cores.iter().map(|c| c.id).collect(),
        }
    }

    /// Whether some cores are markedly slower than others (big.LITTLE).
    pub fn is_heterogeneous(&self) -> bool {
        self.performance_cores().len() < self.cores.len()
    }
}

/// Where an engine's workers run: how many, and the cores they are pinned to (none: the
/// operating system places them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThreadPlacement {
    pub threads: usize,
    pub pinned_cores: Vec<usize>,
}

/// The placement for `threads` workers (0 = default) on `cpu_mask` (empty = default):
/// - an explicit mask pins workers to its cores, round robin, one worker per core by default;
/// - otherwise, on big.LITTLE machines, the workers go to the performance cores (one per
///   core by default) and are pinned there;
/// - otherwise one worker per core, unpinned.
pub fn plan_threads(topology: &CpuTopology, threads: usize, cpu_mask: &[usize]) -> ThreadPlacement {
    let all_cores = topology.cores.len().max(1);
    if !cpu_mask.is_empty() {
        return ThreadPlacement {
            threads: if threads == 0 {
                cpu_mask.len()
            } else {
                threads
            },
            pinned_cores: cpu_mask.to_vec(),
        };
    }
    if topology.is_heterogeneous() {
        let fast = topology.performance_cores();
        return ThreadPlacement {
            threads: if threads == 0 { fast.len() } else { threads },
            pinned_cores: fast,
        };
    }
    ThreadPlacement {
        threads: if threads == 0 {
            std::thread::available_parallelism().map_or(all_cores, |n| n.get())
        } else {
            threads
        },
        pinned_cores: Vec::new(),
    }
}

impl ThreadPlacement {
    /// The core worker `index` is pinned to, if any (round robin over the pinned cores).
    pub fn core_for_worker(&self, index: usize) -> Option<usize> {
        (!self.pinned_cores.is_empty()).then(|| self.pinned_cores[index % self.pinned_cores.len()])
    }

    /// A rayon pool with this placement: `threads` workers, each pinned to its core (a core
    /// the system refuses is left to the scheduler).
    pub fn build_pool(
        &self,
        name: impl Fn(usize) -> String + Send + Sync + 'static,
    ) -> Result<rayon::ThreadPool, rayon::ThreadPoolBuildError> {
        let placement = self.clone();
        rayon::ThreadPoolBuilder::new()
            .num_threads(self.threads)
            .thread_name(name)
            .start_handler(move |index| {
                if let Some(core) = placement.core_for_worker(index)
                    && !core_affinity::set_for_current(core_affinity::CoreId { id: core })
                {
                    log::debug!("worker {index}: could not pin to core {core}");
                }
            })
            .build()
    }
}

impl ThreadPlacement {
    /// The decode team for this placement ([`pocketlm_kernels::pool::Team`]: the helpers spin
    /// between the one-token products of a decode step instead of sleeping in rayon). With
    /// pinned workers the helpers may run on the pinned cores only (on a phone: the
    /// performance cores). `None` where it does not apply: one thread, or more threads than
    /// pinned cores (spinning helpers sharing a core would stall each other and the caller).
    pub fn build_team(&self) -> Option<pocketlm_kernels::pool::Team> {
        if self.threads < 2 {
            return None;
        }
        if self.pinned_cores.is_empty() {
            return Some(pocketlm_kernels::pool::Team::new(self.threads));
        }
        (self.threads <= self.pinned_cores.len()).then(|| {
            pocketlm_kernels::pool::Team::on_cores(self.threads, self.pinned_cores.clone())
        })
    }
}

/// Parses a CPU mask: hexadecimal (`0xf0`, bit N = core N, as llama.cpp's `--cpu-mask`) or a
/// list of cores and ranges (`0-3,6`, as sysfs and `taskset -c`). Sorted, without repeats.
pub fn parse_cpu_mask(mask: &str) -> Result<Vec<usize>, CpuMaskError> {
    let s = mask.trim();
    let syntax = || CpuMaskError::Syntax(mask.to_string());
    let cores = if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(syntax());
        }
        let mut cores = Vec::new();
        for (i, digit) in hex.bytes().rev().enumerate() {
            let value = (digit as char).to_digit(16).ok_or_else(syntax)?;
            for bit in 0..4 {
                if value & (1 << bit) != 0 {
                    cores.push(i * 4 + bit);
                }
            }
        }
        cores
    } else {
        parse_cpu_list(s).map_err(|()| syntax())?
    };
    if cores.is_empty() {
        return Err(syntax());
    }
    if let Some(&core) = cores.iter().find(|&&c| c >= MAX_CORES) {
        return Err(CpuMaskError::TooLarge {
            mask: mask.to_string(),
            core,
            limit: MAX_CORES,
        });
    }
    Ok(cores)
}

/// Parses a sysfs-style list (`0-3,6,8-9`), sorted and without repeats.
fn parse_cpu_list(s: &str) -> Result<Vec<usize>, ()> {
    let mut cores = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (
                a.trim().parse().map_err(drop)?,
                b.trim().parse().map_err(drop)?,
            ),
            None => {
                let n: usize = part.parse().map_err(drop)?;
                (n, n)
            }
        };
        if lo > hi || hi >= MAX_CORES {
            return Err(());
        }
        cores.extend(lo..=hi);
    }
    cores.sort_unstable();
    cores.dedup();
    Ok(cores)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake sysfs CPU directory: `online` and, per core, optional capacity and max
    /// frequency.
    fn fake_sysfs(online: &str, cores: &[(usize, Option<u32>, Option<u64>)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("online"), format!("{online}\n")).unwrap();
        for &(id, capacity, freq) in cores {
            let cpu = dir.path().join(format!("cpu{id}"));
            std::fs::create_dir_all(cpu.join("cpufreq")).unwrap();
            if let Some(c) = capacity {
                std::fs::write(cpu.join("cpu_capacity"), format!("{c}\n")).unwrap();
            }
            if let Some(f) = freq {
                std::fs::write(cpu.join("cpufreq/cpuinfo_max_freq"), format!("{f}\n")).unwrap();
            }
        }
        dir
    }

    #[test]
    fn a_phone_runs_on_its_prime_and_big_cores() {
        // Snapdragon-style 1 + 3 + 4: prime 1024, big 870, little 325.
        let mut cores = vec![(0, Some(325), Some(2_016_000)); 4];
        for (i, c) in cores.iter_mut().enumerate() {
            c.0 = i;
        }
        cores.extend((4..7).map(|i| (i, Some(870), Some(2_803_200))));
        cores.push((7, Some(1024), Some(3_187_200)));
        let sysfs = fake_sysfs("0-7", &cores);
        let topology = CpuTopology::read(sysfs.path());
        assert_eq!(topology.cores.len(), 8);
        assert!(topology.is_heterogeneous());
        assert_eq!(topology.performance_cores(), [4, 5, 6, 7]);
        let plan = plan_threads(&topology, 0, &[]);
        assert_eq!(plan.threads, 4);
        assert_eq!(plan.pinned_cores, [4, 5, 6, 7]);
        assert_eq!(plan.core_for_worker(5), Some(5));
        // Explicit thread counts keep the placement; an explicit mask wins.
        assert_eq!(plan_threads(&topology, 2, &[]).pinned_cores, [4, 5, 6, 7]);
        let masked = plan_threads(&topology, 0, &[6, 7]);
        assert_eq!((masked.threads, masked.pinned_cores), (2, vec![6, 7]));
    }

    #[test]
    fn frequencies_decide_without_capacities() {
        // 2 + 6 with cpufreq only, and core 3 offline.
        let cores: Vec<_> = (0..8)
            .filter(|&i| i != 3)
            .map(|i| (i, None, Some(if i >= 6 { 2_400_000 } else { 1_800_000 })))
            .collect();
        let sysfs = fake_sysfs("0-2,4-7", &cores);
        let topology = CpuTopology::read(sysfs.path());
        assert_eq!(topology.cores.len(), 7);
        // 1.8 / 2.4 = 0.75: the little cores here are fast enough to count.
        assert!(!topology.is_heterogeneous());
        let slow: Vec<_> = (0..4)
            .map(|i| (i, None, Some(1_000_000)))
            .chain([(4, None, Some(3_000_000))])
            .collect();
        let sysfs = fake_sysfs("0-4", &slow);
        assert_eq!(CpuTopology::read(sysfs.path()).performance_cores(), [4]);
    }

    #[test]
    fn equal_cores_are_all_used_unpinned() {
        // A Raspberry Pi 5: four equal Cortex-A76.
        let cores: Vec<_> = (0..4).map(|i| (i, Some(1024), Some(2_400_000))).collect();
        let sysfs = fake_sysfs("0-3", &cores);
        let topology = CpuTopology::read(sysfs.path());
        assert!(!topology.is_heterogeneous());
        assert_eq!(topology.performance_cores(), [0, 1, 2, 3]);
        let plan = plan_threads(&topology, 3, &[]);
        assert_eq!((plan.threads, plan.pinned_cores.len()), (3, 0));
        assert_eq!(plan.core_for_worker(0), None);
        // A VM with capacities but no cpufreq (this kind of machine), one with neither, and
        // none at all.
        let vm = fake_sysfs("0-1", &[(0, Some(1024), None), (1, Some(1024), None)]);
        assert!(!CpuTopology::read(vm.path()).is_heterogeneous());
        let bare = fake_sysfs("0-1", &[(0, None, None), (1, None, None)]);
        assert_eq!(CpuTopology::read(bare.path()).performance_cores(), [0, 1]);
        let nothing = tempfile::tempdir().unwrap();
        assert_eq!(CpuTopology::read(nothing.path()), CpuTopology::default());
        assert!(plan_threads(&CpuTopology::default(), 0, &[]).threads >= 1);
    }

    #[test]
    fn garbage_in_sysfs_counts_as_absent() {
        let sysfs = fake_sysfs("0-1", &[(0, Some(1024), None), (1, None, None)]);
        std::fs::write(sysfs.path().join("cpu1/cpu_capacity"), "fast\n").unwrap();
        // One core without a capacity: capacities are not used, nor frequencies (absent).
        assert!(!CpuTopology::read(sysfs.path()).is_heterogeneous());
        std::fs::write(sysfs.path().join("online"), "3-1\n").unwrap();
        assert!(CpuTopology::read(sysfs.path()).cores.is_empty());
    }

    #[test]
    fn masks_parse_as_hex_or_lists() {
        assert_eq!(parse_cpu_mask("0xf0").unwrap(), [4, 5, 6, 7]);
        assert_eq!(parse_cpu_mask("0X3").unwrap(), [0, 1]);
        assert_eq!(parse_cpu_mask("0-3,6").unwrap(), [0, 1, 2, 3, 6]);
        assert_eq!(parse_cpu_mask(" 7,4-5,5 ").unwrap(), [4, 5, 7]);
        for bad in ["", "0x", "0x0", "0xg", "3-1", "a", "1,,x", "-1"] {
            assert!(
                matches!(parse_cpu_mask(bad), Err(CpuMaskError::Syntax(_))),
                "{bad:?}"
            );
        }
        let err = parse_cpu_mask("0-99999").unwrap_err();
        assert!(err.to_string().contains("0-99999"), "{err}");
        let err = parse_cpu_mask(&format!("0x1{}", "0".repeat(1100))).unwrap_err();
        assert!(matches!(err, CpuMaskError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn pinned_pool_runs_on_its_cores() {
        // Pin to core 0 (every machine has it): the pool works and reports its size.
        let placement = ThreadPlacement {
            threads: 2,
            pinned_cores: vec![0],
        };
        let pool = placement.build_pool(|i| format!("test-{i}")).unwrap();
        assert_eq!(pool.current_num_threads(), 2);
        let sum: u64 = pool.install(|| {
            use rayon::prelude::*;
            (0..1000u64).into_par_iter().sum()
        });
        assert_eq!(sum, 499_500);
    }

    #[test]
    fn decode_teams_follow_the_placement() {
        let team = |threads: usize, pinned_cores: Vec<usize>| {
            ThreadPlacement {
                threads,
                pinned_cores,
            }
            .build_team()
            .map(|t| t.workers())
        };
        assert_eq!(team(1, vec![]), None, "one thread needs no team");
        assert_eq!(team(4, vec![]), Some(4));
        // Pinned: helpers on the pinned cores, as many workers as cores at most.
        assert_eq!(team(2, vec![0, 1]), Some(2));
        assert_eq!(team(3, vec![0, 1]), None, "more threads than pinned cores");
    }
}

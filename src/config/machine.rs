//! What this machine offers, read once: the CPUs this process may use, the CPU features that
//! decide which precisions run fast, the default split of threads between decoding and the
//! model, and the device a flag asks for.

/// The device the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRequest {
    Auto,
    Cpu,
    Cuda(usize),
}

pub fn parse_device(s: &str) -> Result<DeviceRequest, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "auto" => Ok(DeviceRequest::Auto),
        "cpu" => Ok(DeviceRequest::Cpu),
        "cuda" | "gpu" => Ok(DeviceRequest::Cuda(0)),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Ok(DeviceRequest::Cuda(n)),
            _ => Err(format!(
                "--device {s:?} is not one of auto, cpu, cuda, cuda:N"
            )),
        },
    }
}

/// CPUs this process may use: the affinity mask and the cgroup CPU quota both count
/// (`std::thread::available_parallelism` reads both on Linux).
pub fn available_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// The CPU features that decide which precisions run fast here, from /proc/cpuinfo (x86-64
/// Linux): `avx2`, `avx512f`, `avx512_bf16`, `amx_bf16`, `amx_int8`, `avx512_vnni`,
/// `avx_vnni`. Empty where the file is not there. Read once: the flags do not change while the
/// process runs, and `/health` reports them on every probe.
pub fn cpu_features() -> &'static [&'static str] {
    static FEATURES: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();
    FEATURES.get_or_init(read_cpu_features)
}

/// Every flag of /proc/cpuinfo's first `flags` line; `None` where the file is not there.
pub fn cpu_flags() -> Option<&'static [String]> {
    static FLAGS: std::sync::OnceLock<Option<Vec<String>>> = std::sync::OnceLock::new();
    FLAGS
        .get_or_init(|| {
            let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
            let line = text.lines().find(|l| l.starts_with("flags"))?;
            Some(line.split_whitespace().skip(2).map(str::to_owned).collect())
        })
        .as_deref()
}

fn read_cpu_features() -> Vec<&'static str> {
    const FEATURES: [&str; 7] = [
        "avx2",
        "avx512f",
        "avx512_vnni",
        "avx_vnni",
        "avx512_bf16",
        "amx_bf16",
        "amx_int8",
    ];
    let flags = cpu_flags().unwrap_or_default();
    FEATURES
        .into_iter()
        .filter(|f| flags.iter().any(|g| g == f))
        .collect()
}

/// Whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16), from [`cpu_features`].
/// Elsewhere libtorch emulates bf16 in fp32 arithmetic: ResNet-18 runs at about a tenth of its
/// fp32 speed on an AVX2-only Zen 3, against 1.7x fp32 on a Zen 4 with AVX512-BF16.
pub fn native_bf16(features: &[&str]) -> bool {
    features
        .iter()
        .any(|f| matches!(*f, "avx512_bf16" | "amx_bf16"))
}

/// Default thread split. Decoding and resizing are short compared with a forward pass, so the
/// model gets every core and the preprocessing pool as many threads as there are cores: the two
/// rarely run flat out at the same moment. Measured on 2 cores (BENCHMARKS.md): one decoding
/// thread loses about 6% of saturated throughput, one intra-op thread about 35%, and making
/// decoding wait while a forward pass runs gained nothing and raised p99. Explicit values win.
pub fn split_threads(cpus: usize, preprocess: usize, intra_op: usize) -> (usize, usize) {
    let cpus = cpus.max(1);
    let pre = if preprocess > 0 { preprocess } else { cpus };
    let intra = if intra_op > 0 { intra_op } else { cpus };
    (pre, intra)
}

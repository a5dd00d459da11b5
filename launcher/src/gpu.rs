//! Finding the NVIDIA GPUs this process may use.
//!
//! If `CUDA_VISIBLE_DEVICES` is set it decides, as it does for CUDA itself:
//! its entries are the visible devices. Otherwise the GPUs are counted with
//! `nvidia-smi -L`, falling back to `/proc/driver/nvidia/gpus` when
//! nvidia-smi is missing or fails.

use std::ffi::OsStr;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long `nvidia-smi -L` may take before it is abandoned.
const NVIDIA_SMI_TIMEOUT: Duration = Duration::from_secs(10);

/// The GPUs visible to this process and how that was determined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VisibleGpus {
    /// Device identifiers in CUDA's order, as CUDA_VISIBLE_DEVICES would name
    /// them: the entries of CUDA_VISIBLE_DEVICES, or `0..n`.
    pub devices: Vec<String>,
    /// Where the answer came from, for messages.
    pub source: String,
}

/// Parses `CUDA_VISIBLE_DEVICES` the way the CUDA runtime does: a
/// comma-separated list of indices or `GPU-`/`MIG-` UUIDs, cut at the first
/// invalid entry (so `""`, `"-1"` and Slurm's `"NoDevFiles"` mean no GPU).
pub fn parse_cuda_visible_devices(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .take_while(|entry| {
            (!entry.is_empty() && entry.bytes().all(|b| b.is_ascii_digit()))
                || entry.starts_with("GPU-")
                || entry.starts_with("MIG-")
        })
        .map(str::to_owned)
        .collect()
}

/// Counts the GPUs in `nvidia-smi -L` output (lines starting with `GPU `;
/// MIG instances are listed indented under their GPU and are not counted).
pub fn count_nvidia_smi_gpus(output: &str) -> usize {
    output.lines().filter(|l| l.starts_with("GPU ")).count()
}

/// Runs `nvidia-smi -L` with a timeout. `None` if it cannot run, fails or
/// hangs.
fn nvidia_smi_count() -> Option<usize> {
    let mut child = Command::new("nvidia-smi")
        .arg("-L")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut stdout = child.stdout.take()?;
    let reader = std::thread::Builder::new()
        .name("nvidia-smi".into())
        .spawn(move || {
            let mut text = String::new();
            stdout.read_to_string(&mut text).map(|_| text)
        })
        .ok();
    let deadline = Instant::now() + NVIDIA_SMI_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                tracing::warn!(
                    "nvidia-smi -L did not finish in {NVIDIA_SMI_TIMEOUT:?}; ignoring it"
                );
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let text = reader?.join().ok()?.ok()?;
    if status?.success() {
        Some(count_nvidia_smi_gpus(&text))
    } else {
        None
    }
}

/// Counts the entries of `/proc/driver/nvidia/gpus` (one per GPU).
fn procfs_count() -> Option<usize> {
    std::fs::read_dir("/proc/driver/nvidia/gpus")
        .ok()
        .map(|dir| dir.flatten().count())
}

/// Determines the visible GPUs; `cuda_visible_devices` is the launcher's
/// own `CUDA_VISIBLE_DEVICES`, if set.
pub fn detect(cuda_visible_devices: Option<&OsStr>) -> VisibleGpus {
    if let Some(value) = cuda_visible_devices {
        let value = value.to_string_lossy();
        return VisibleGpus {
            devices: parse_cuda_visible_devices(&value),
            source: format!("CUDA_VISIBLE_DEVICES={value:?}"),
        };
    }
    let (count, source) = match nvidia_smi_count() {
        Some(n) => (n, "nvidia-smi -L"),
        None => match procfs_count() {
            Some(n) => (n, "/proc/driver/nvidia/gpus"),
            None => (0, "no nvidia-smi and no /proc/driver/nvidia/gpus"),
        },
    };
    VisibleGpus {
        devices: (0..count).map(|i| i.to_string()).collect(),
        source: source.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_visible_devices_follows_cuda_rules() {
        assert_eq!(parse_cuda_visible_devices("0,1,2"), ["0", "1", "2"]);
        assert_eq!(parse_cuda_visible_devices(" 3, 1 "), ["3", "1"]);
        assert_eq!(parse_cuda_visible_devices("0,-1,2"), ["0"]);
        assert!(parse_cuda_visible_devices("").is_empty());
        assert!(parse_cuda_visible_devices("-1").is_empty());
        assert!(parse_cuda_visible_devices("NoDevFiles").is_empty());
        assert_eq!(
            parse_cuda_visible_devices("GPU-8a1b,MIG-77c,4"),
            ["GPU-8a1b", "MIG-77c", "4"]
        );
    }

    #[test]
    fn nvidia_smi_listing_is_counted_without_mig_instances() {
        let out = "\
GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1111)
  MIG 3g.40gb     Device  0: (UUID: MIG-aaaa)
GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-2222)
";
        assert_eq!(count_nvidia_smi_gpus(out), 2);
        assert_eq!(count_nvidia_smi_gpus("No devices were found\n"), 0);
    }

    #[test]
    fn cuda_visible_devices_decides_without_probing() {
        let gpus = detect(Some(OsStr::new("")));
        assert!(gpus.devices.is_empty());
        assert!(gpus.source.contains("CUDA_VISIBLE_DEVICES"));
        let gpus = detect(Some(OsStr::new("2,3")));
        assert_eq!(gpus.devices, ["2", "3"]);
    }
}

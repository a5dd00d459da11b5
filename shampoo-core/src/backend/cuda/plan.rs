//! The planning mode of the CUDA backend: the backend's own code runs with
//! no device, and every kernel launch, library call, copy and host wait it
//! would issue is recorded instead ([`CudaBackend::planner`]). This is how
//! the launches of a step are counted on a machine without a GPU: not from
//! a model of the backend, but from the calls its code makes.
//!
//! A planner hands out fake device addresses, reads back ones (flags say
//! "finite", statuses "solved"), and runs no arithmetic: what it records
//! is exact for steps whose calls do not depend on the data (every step
//! without a root inverse); for a root-inverse step by an iteration with
//! a data-dependent stopping rule it records the iteration run to its cap.
//!
//! [`CudaBackend::planner`]: super::CudaBackend::planner

use std::sync::Mutex;

use super::kernels::Kernel;

/// What one recorded call is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Call {
    /// One of the project's kernels.
    Kernel(Kernel),
    /// A cuBLAS (strided or pointer-array) batched GEMM.
    Gemm,
    /// A cuSOLVER call (named).
    Solver(&'static str),
    /// A host-to-device copy.
    Upload,
    /// A device-to-host copy.
    Download,
    /// A device-to-device copy or a memset.
    DeviceCopy,
    /// The host waits for the stream.
    HostWait,
}

impl Call {
    /// Whether the call is queued on the stream (a kernel launch, a library
    /// call or a copy), as opposed to a host wait.
    pub fn is_launch(self) -> bool {
        self != Call::HostWait
    }

    /// A short name for reports.
    pub fn name(self) -> String {
        match self {
            Call::Kernel(k) => format!("kernel {}", k.base_name()),
            Call::Gemm => "cublas gemm (batched)".into(),
            Call::Solver(s) => format!("cusolver {s}"),
            Call::Upload => "copy host to device".into(),
            Call::Download => "copy device to host".into(),
            Call::DeviceCopy => "copy device to device / memset".into(),
            Call::HostWait => "host waits for the stream".into(),
        }
    }
}

/// One recorded call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Launch {
    /// The algorithm's phase when it was issued ([`Backend::phase`]).
    ///
    /// [`Backend::phase`]: crate::backend::Backend::phase
    pub phase: &'static str,
    /// What it is.
    pub call: Call,
    /// Floating-point operations of a GEMM (`2 m n k` per product); 0 else.
    pub flops: f64,
    /// Matrix products of a GEMM (its batch); 0 else.
    pub products: usize,
}

/// The recorder of a planning backend.
#[derive(Debug)]
pub(super) struct Recorder {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    phase: &'static str,
    calls: Vec<Launch>,
    next_address: u64,
    tables: std::collections::HashMap<Vec<u64>, u64>,
}

impl Recorder {
    pub(super) fn new() -> Self {
        Recorder {
            state: Mutex::new(State {
                phase: "setup",
                calls: Vec::new(),
                // Far from 0 (a null address means "absent" to the kernels).
                next_address: 1 << 40,
                tables: std::collections::HashMap::new(),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn record(&self, call: Call, flops: f64, products: usize) {
        let mut s = self.state();
        let phase = s.phase;
        s.calls.push(Launch {
            phase,
            call,
            flops,
            products,
        });
    }

    pub(super) fn set_phase(&self, phase: &'static str) {
        self.state().phase = phase;
    }

    /// A fresh fake address for `bytes` bytes (256-byte aligned, as the
    /// driver's allocations are).
    pub(super) fn alloc(&self, bytes: usize) -> u64 {
        let mut s = self.state();
        let p = s.next_address;
        s.next_address += (bytes.max(1) as u64).div_ceil(256) * 256;
        p
    }

    /// The fake address of a device table with these words: the first
    /// time, a fresh one and a recorded upload (as the device's cache does).
    pub(super) fn table(&self, words: Vec<u64>) -> u64 {
        let mut s = self.state();
        if let Some(&p) = s.tables.get(&words) {
            return p;
        }
        let p = s.next_address;
        s.next_address += (8 * words.len().max(1) as u64).div_ceil(256) * 256;
        let phase = s.phase;
        s.calls.push(Launch {
            phase,
            call: Call::Upload,
            flops: 0.0,
            products: 0,
        });
        s.tables.insert(words, p);
        p
    }

    pub(super) fn take(&self) -> Vec<Launch> {
        std::mem::take(&mut self.state().calls)
    }
}

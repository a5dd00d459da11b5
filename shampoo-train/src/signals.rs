//! SIGINT and SIGTERM: finish the current step, then stop cleanly.
//!
//! The binary installs [`Interrupt::install`]: the first SIGINT or SIGTERM
//! only sets a flag, which the training loop reads once per step (and the
//! ranks agree on, so that all of them stop after the same step); the loop
//! then writes a checkpoint when checkpointing is on and returns
//! [`Error::Interrupted`](crate::Error::Interrupted), and the binary exits
//! with the conventional code 128 + signal (130 for SIGINT, 143 for
//! SIGTERM). A second signal ends the process at once with that code.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// The signal that asked the run to stop, if any; cheap to read.
#[derive(Debug, Clone, Default)]
pub struct Interrupt {
    signal: Arc<AtomicUsize>,
}

impl Interrupt {
    /// An interrupt that only [`Interrupt::raise`] sets (library use: no
    /// signal handler is installed).
    pub fn none() -> Self {
        Self::default()
    }

    /// Installs handlers for SIGINT and SIGTERM that set this flag; a
    /// second one exits the process immediately with 128 + signal.
    pub fn install() -> std::io::Result<Self> {
        let this = Self::default();
        let armed = Arc::new(AtomicBool::new(false));
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            // Order matters: the shutdown only fires once `armed` is set,
            // which the registration after it does on the first signal.
            signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, armed.clone())?;
            signal_hook::flag::register(sig, armed.clone())?;
            signal_hook::flag::register_usize(sig, this.signal.clone(), sig as usize)?;
        }
        Ok(this)
    }

    /// The signal received, if any.
    pub fn signal(&self) -> Option<i32> {
        match self.signal.load(Ordering::SeqCst) {
            0 => None,
            s => i32::try_from(s).ok(),
        }
    }

    /// Sets the flag as if `signal` had arrived.
    pub fn raise(&self, signal: i32) {
        self.signal
            .store(usize::try_from(signal).unwrap_or(1), Ordering::SeqCst);
    }
}

/// `SIGINT`, `SIGTERM`, or `signal N`.
pub fn name(signal: i32) -> String {
    match signal {
        signal_hook::consts::SIGINT => "SIGINT".into(),
        signal_hook::consts::SIGTERM => "SIGTERM".into(),
        s => format!("signal {s}"),
    }
}

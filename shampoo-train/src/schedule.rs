//! Learning-rate schedules: linear warmup, then cosine, step decay or constant.

/// Shape of the learning rate after warmup.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum ScheduleKind {
    /// Half a cosine from the peak down to 0 at the last step.
    Cosine,
    /// Multiply by `gamma` every `decay_steps` steps.
    Step,
    /// Stay at the peak.
    Constant,
}

/// A learning-rate schedule over `total` steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warmup steps: step `s < warmup` (0-based) uses `lr * (s + 1) / warmup`.
    pub warmup: u64,
    /// Total steps of the run.
    pub total: u64,
    /// What happens after the warmup.
    pub kind: ScheduleKind,
    /// Step decay: period in steps (counted after the warmup).
    pub decay_steps: u64,
    /// Step decay: factor.
    pub gamma: f64,
}

impl Schedule {
    /// Learning rate of step `s` (0-based).
    pub fn lr_at(&self, s: u64) -> f64 {
        if s < self.warmup {
            return self.lr * (s + 1) as f64 / self.warmup as f64;
        }
        let t = s - self.warmup;
        match self.kind {
            ScheduleKind::Constant => self.lr,
            ScheduleKind::Cosine => {
                let span = self.total.saturating_sub(self.warmup).max(1) as f64;
                0.5 * self.lr * (1.0 + (std::f64::consts::PI * t as f64 / span).cos())
            }
            ScheduleKind::Step => self.lr * self.gamma.powi((t / self.decay_steps.max(1)) as i32),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_to_zero() {
        let s = Schedule {
            lr: 1e-3,
            warmup: 100,
            total: 1000,
            kind: ScheduleKind::Cosine,
            decay_steps: 1,
            gamma: 1.0,
        };
        assert_eq!(s.lr_at(0), 1e-5);
        assert_eq!(s.lr_at(99), 1e-3);
        assert_eq!(s.lr_at(100), 1e-3);
        assert!((s.lr_at(550) - 0.5e-3).abs() < 1e-15);
        assert!(s.lr_at(999) > 0.0 && s.lr_at(999) < 1e-7);
    }

    #[test]
    fn step_decay() {
        let s = Schedule {
            lr: 0.1,
            warmup: 0,
            total: 100,
            kind: ScheduleKind::Step,
            decay_steps: 30,
            gamma: 0.1,
        };
        assert_eq!(s.lr_at(29), 0.1);
        assert_eq!(s.lr_at(30), 0.1 * 0.1);
        assert_eq!(s.lr_at(60), 0.1 * 0.1 * 0.1);
    }
}

//! How much memory an optimizer allocates, known before it allocates it.
//!
//! [`Shampoo::new`](crate::Shampoo::new) allocates all its memory at once
//! (state and scratch, `algorithm/state.rs`). A configuration that merges
//! dimensions into huge blocks (`max_preconditioner_dim` far above the
//! parameters' sizes) asks for factor matrices of terabytes; programs call
//! [`check_allocation`] first to refuse such a configuration with the size
//! and the block responsible, instead of failing in the allocator.

use crate::algorithm::state::{FLAG_SECTIONS, scratch_roles};
use crate::config::{Amortized, Orthogonalization, Preconditioner, ShampooConfig, WeightDecayType};
use crate::layout::Layout;
use crate::{DType, Error, Result};

/// Bytes [`Shampoo::new`](crate::Shampoo::new) allocates for `layout`'s
/// owned blocks: factors, roots, root-inverse work, per-element state and
/// the step's scratch (the same buffers as `algorithm/state.rs`), without
/// the backend's own workspace. Saturates instead of overflowing.
pub fn allocation_bytes(layout: &Layout, config: &ShampooConfig, dtype: DType) -> u64 {
    let fdtype = config.factor_dtype_for(dtype);
    let (p, f) = (dtype.size() as u128, fdtype.size() as u128);
    let roles = scratch_roles(config) as u128;
    let eigenpairs = matches!(config.amortized(), Amortized::Eigenpairs(_));
    let averaging = config.iterate_averaging.is_some();
    let decay = config.weight_decay != 0.0 && config.weight_decay_type != WeightDecayType::L2;
    let newton_schulz = matches!(
        config.preconditioner,
        Preconditioner::SpectralDescent {
            orthogonalization: Orthogonalization::NewtonSchulz { .. },
        }
    );
    let mut total: u128 = layout.direction_len as u128 * p;
    for g in &layout.groups {
        let (count, len) = (g.count() as u128, g.len() as u128);
        for fac in &g.factors {
            let n = fac.size as u128;
            let mats = count * n * n;
            // stats, work, scratch roles (factor dtype); root (parameter
            // dtype); values and flags.
            total +=
                mats * (f * (2 + roles) + p) + count * n * f + FLAG_SECTIONS as u128 * count * f;
            if eigenpairs {
                // kept eigenvectors, eigenvalues and their powers
                total += mats * f + 2 * count * n * f;
            }
        }
        let mut per_elem = 3; // grad, two product buffers
        per_elem += u128::from(decay || averaging);
        per_elem += 2 * u128::from(config.betas[0] != 0.0);
        per_elem += u128::from(config.grafting.is_some_and(|g| g.has_accumulator()));
        per_elem += u128::from(config.momentum.is_some());
        per_elem += u128::from(config.is_eigenvalue_corrected());
        per_elem += u128::from(averaging);
        let grad_factor = u128::from(!g.factors.is_empty() && fdtype != dtype) * f;
        total += len * (per_elem * p + grad_factor);
        // per-block scalars, squared norms
        total += (count.max(1) + 2 * count) * p;
        if newton_schulz {
            let k = g.dims.iter().copied().min().unwrap_or(0) as u128;
            total += 2 * count * k * k * p;
        }
    }
    u64::try_from(total).unwrap_or(u64::MAX)
}

/// Physical memory of this machine in bytes (`MemTotal` of
/// `/proc/meminfo`), or `None` where it cannot be read.
pub fn host_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// `bytes` in binary units, e.g. `1.50 GiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// Checks, without allocating, that an optimizer for parameters of
/// `shapes` fits in `limit` bytes (say [`host_memory_bytes`]); returns the
/// bytes it needs. An [`Error::TooLarge`] names the size, the limit
/// (`limit_name`, say "this machine's memory") and the widest factor with
/// its parameter, as `name_of(index)` names it (say `parameter 2`).
pub fn check_allocation(
    shapes: &[Vec<usize>],
    config: &ShampooConfig,
    dtype: DType,
    limit: u64,
    limit_name: &str,
    name_of: &dyn Fn(usize) -> String,
) -> Result<u64> {
    config.validate()?;
    let layout = Layout::new(shapes, config, &|_| true)?;
    let needed = allocation_bytes(&layout, config, dtype);
    if needed <= limit {
        return Ok(needed);
    }
    let widest = layout
        .groups
        .iter()
        .flat_map(|g| g.factors.iter().map(move |f| (f.size, g.blocks[0])))
        .max();
    let detail = match widest {
        Some((size, block)) => {
            let param = layout.blocks[block].param;
            format!(
                "its widest factor is {size} x {size} ({} of shape {:?}, merged and blocked with max_preconditioner_dim {}); lower max_preconditioner_dim",
                name_of(param),
                layout.params[param].shape,
                config.max_preconditioner_dim
            )
        }
        None => "the parameters alone are that large".into(),
    };
    Err(Error::TooLarge {
        needed,
        limit,
        what: format!(
            "the Shampoo optimizer needs {} of memory, more than {limit_name} ({}): {detail}",
            human_bytes(needed),
            human_bytes(limit)
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CpuBackend, Shampoo};

    #[test]
    fn human_bytes_uses_binary_units() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 29), "1.50 GiB");
        assert_eq!(human_bytes(644_513_529_856), "600.25 GiB");
    }

    fn bytes(b: &crate::backend::cpu::CpuBuffer) -> u64 {
        use crate::backend::cpu::CpuBuffer;
        match b {
            CpuBuffer::F32(v) => 4 * v.len() as u64,
            CpuBuffer::F64(v) => 8 * v.len() as u64,
        }
    }

    /// Every buffer a built optimizer holds, summed.
    fn allocated(opt: &Shampoo<CpuBackend>) -> u64 {
        let mut total = bytes(&opt.directions);
        for g in &opt.groups {
            let opts = [
                &g.grad_factor,
                &g.weights,
                &g.graft,
                &g.momentum,
                &g.corrected,
                &g.z,
            ];
            total += bytes(&g.grad) + bytes(&g.work[0]) + bytes(&g.work[1]);
            total += bytes(&g.sq_norms) + bytes(&g.scalars);
            total += g.ortho.iter().flatten().map(bytes).sum::<u64>();
            total += opts
                .iter()
                .filter_map(|b| b.as_ref())
                .map(bytes)
                .sum::<u64>();
            if let Some((a, b)) = &g.filtered {
                total += bytes(a) + bytes(b);
            }
            for f in &g.factors {
                total += bytes(&f.stats) + bytes(&f.root) + bytes(&f.work);
                total += bytes(&f.values) + bytes(&f.flags);
                total += f.scratch.iter().map(bytes).sum::<u64>();
                if let Some((v, d)) = &f.eigen {
                    total += bytes(v) + bytes(d);
                }
                total += f.powers.iter().map(bytes).sum::<u64>();
            }
        }
        total
    }

    #[test]
    fn allocation_bytes_is_what_construction_allocates() {
        let shapes = [vec![40, 30], vec![30], vec![7, 5, 3]];
        for extra in [
            r#""grafting": {"type": "adam"}"#,
            r#""momentum": {"momentum": 0.9}, "betas": [0.0, 0.999], "factor_dtype": "f64""#,
            r#""preconditioner": {"type": "eigenvalue_corrected"}"#,
            r#""preconditioner": {"type": "root_inv", "root_inverse": {"method": "coupled_newton"}}"#,
            r#""preconditioner": {"type": "root_inv", "root_inverse": {"method": "batched_newton"}}"#,
            r#""start_preconditioning_step": "never""#,
            r#""preconditioner": {"type": "eigenvalue_corrected", "eigendecomposition": {"method": "qr"}}"#,
            r#""preconditioner": {"type": "root_inv", "root_inverse": {"method": "coupled_higher_order", "rel_epsilon": 1e-3, "abs_epsilon": 1e-9}}"#,
            r#""preconditioner": {"type": "eigendecomposed", "eigendecomposition": {"method": "eigh", "tolerance": 0.05}}"#,
            r#""preconditioner": {"type": "kl_shampoo", "variant": "eigendecomposed"}"#,
            r#""preconditioner": {"type": "spectral_descent"}"#,
            r#""iterate_averaging": {"type": "schedule_free"}"#,
        ] {
            let cfg = ShampooConfig::from_json(&format!(
                r#"{{"lr": 0.1, "max_preconditioner_dim": 16, "weight_decay": 0.1, {extra}}}"#
            ))
            .unwrap();
            // Spectral descent takes 2-D blocks only.
            let shapes = if extra.contains("spectral") {
                &shapes[..1]
            } else {
                &shapes[..]
            };
            let layout = Layout::new(shapes, &cfg, &|_| true).unwrap();
            let est = allocation_bytes(&layout, &cfg, DType::F32);
            let opt = Shampoo::new(cfg, shapes, DType::F32, CpuBackend::new(1).unwrap()).unwrap();
            assert_eq!(est, allocated(&opt), "{extra}");
        }
    }

    #[test]
    fn a_huge_merged_block_is_refused_with_its_size() {
        let cfg =
            ShampooConfig::from_json(r#"{"lr": 0.1, "max_preconditioner_dim": 1000000000000}"#)
                .unwrap();
        let shapes = vec![vec![128, 3136], vec![128]];
        let name = |i: usize| format!("parameter {i}");
        let err = check_allocation(&shapes, &cfg, DType::F32, 1 << 40, "1 TiB", &name).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("needs 2.34 TiB of memory, more than 1 TiB (1.00 TiB)"),
            "{msg}"
        );
        assert!(
            msg.contains("widest factor is 401408 x 401408 (parameter 0 of shape [128, 3136]"),
            "{msg}"
        );
        let ok =
            ShampooConfig::from_json(r#"{"lr": 0.1, "max_preconditioner_dim": 1024}"#).unwrap();
        assert!(check_allocation(&shapes, &ok, DType::F32, 1 << 40, "1 TiB", &name).is_ok());
    }
}

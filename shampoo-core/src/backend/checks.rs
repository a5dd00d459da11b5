//! Checks of jobs that are the same for every backend: a selection's
//! indices, a view's length, a view's dtype.

use crate::{DType, Error, Result};

/// Checks that a view holds `count * per` elements.
pub(crate) fn check_len(
    op: &'static str,
    what: &str,
    len: usize,
    count: usize,
    per: usize,
) -> Result<()> {
    if len != count * per {
        return Err(Error::backend(
            op,
            format!("{what} has {len} elements, expected {count} x {per}"),
        ));
    }
    Ok(())
}

/// Checks a selection's indices.
pub(crate) fn check_select(op: &'static str, select: Option<&[u32]>, count: usize) -> Result<()> {
    match select.and_then(|s| s.iter().find(|&&i| i as usize >= count)) {
        Some(&bad) => Err(Error::backend(
            op,
            format!("selected index {bad} out of {count}"),
        )),
        None => Ok(()),
    }
}

/// Checks that every dtype equals the job's.
pub(crate) fn same_dtype(op: &'static str, dt: DType, others: &[(&str, DType)]) -> Result<()> {
    match others.iter().find(|(_, d)| *d != dt) {
        Some((what, d)) => Err(Error::backend(
            op,
            format!("{what} is {d}, expected {dt} data"),
        )),
        None => Ok(()),
    }
}

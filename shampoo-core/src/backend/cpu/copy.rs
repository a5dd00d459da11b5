//! Gathering blocks out of parameter-shaped tensors and scattering
//! directions back.

use super::{CpuBackend, check_select, take_mut, typed, typed_mut};
use crate::backend::{GatherJob, ScatterJob, TableEntry, check_table};
use crate::{DType, Error, Float, HostView, Result};

/// Elements `src, src + step, ..` of a parameter and `dst, dst + 1, ..` of
/// its packed block, `len` of each.
#[derive(Debug, Clone, Copy)]
struct Run {
    src: usize,
    dst: usize,
    len: usize,
    step: usize,
}

/// One block's runs.
#[derive(Debug, Clone)]
struct Entry {
    param: usize,
    numel: usize,
    packed_offset: usize,
    /// `(offset in the parameter's memory, offset in the block, length,
    /// memory step)`: the step is 1 for row-major parameters, the innermost
    /// stride for strided ones (channels-last).
    runs: Vec<Run>,
}

/// Precomputed block geometry. Construction checks that no two blocks
/// overlap, neither in their packed ranges nor in any parameter.
#[derive(Debug, Clone)]
pub struct CpuBlockTable {
    entries: Vec<Entry>,
    /// Entry indices by packed offset.
    packed_order: Vec<usize>,
    /// One past the largest element touched, per parameter index.
    extent: Vec<usize>,
}

impl CpuBlockTable {
    pub(super) fn new(table: Vec<TableEntry>) -> Result<Self> {
        let extent = check_table(&table)?;
        let entries: Vec<Entry> = table
            .into_iter()
            .map(|e| {
                let mut runs = Vec::new();
                e.block.for_each_memory_run(|src, dst, len, step| {
                    runs.push(Run {
                        src,
                        dst,
                        len,
                        step,
                    })
                });
                Entry {
                    param: e.block.param,
                    numel: e.block.numel(),
                    packed_offset: e.packed_offset,
                    runs,
                }
            })
            .collect();
        let mut packed_order: Vec<usize> = (0..entries.len()).collect();
        packed_order.sort_by_key(|&i| entries[i].packed_offset);
        Ok(CpuBlockTable {
            entries,
            packed_order,
            extent,
        })
    }

    /// Splits `out` into the entries' packed chunks: `(entry index, chunk)`.
    fn packed_chunks<'a, T>(&self, out: &'a mut [T]) -> Result<Vec<(usize, &'a mut [T])>> {
        let mut rest = out;
        let mut pos = 0;
        let mut res = Vec::with_capacity(self.entries.len());
        for &i in &self.packed_order {
            let e = &self.entries[i];
            if e.packed_offset + e.numel > pos + rest.len() {
                return Err(Error::backend(
                    "gather",
                    "packed buffer too small for its table",
                ));
            }
            let skip = e.packed_offset - pos;
            let (_, tail) = rest.split_at_mut(skip);
            let (chunk, tail) = tail.split_at_mut(e.numel);
            res.push((i, chunk));
            rest = tail;
            pos = e.packed_offset + e.numel;
        }
        Ok(res)
    }
}

struct GatherTask<'a, T> {
    entry: &'a Entry,
    out: &'a mut [T],
    src: &'a [T],
    add: Option<(&'a [T], T)>,
}

fn gather_task<T: Float>(t: GatherTask<'_, T>) {
    for &Run {
        src,
        dst,
        len,
        step,
    } in &t.entry.runs
    {
        let out = &mut t.out[dst..dst + len];
        if step != 1 {
            for (j, o) in out.iter_mut().enumerate() {
                let at = src + j * step;
                *o = match t.add {
                    None => t.src[at],
                    Some((a, coef)) => t.src[at] + coef * a[at],
                };
            }
            continue;
        }
        let s = &t.src[src..src + len];
        match t.add {
            None => out.copy_from_slice(s),
            Some((a, coef)) => {
                for ((o, &x), &w) in out.iter_mut().zip(s).zip(&a[src..src + len]) {
                    *o = x + coef * w;
                }
            }
        }
    }
}

fn param_view<'s>(sources: &[Option<HostView<'s>>], p: usize, what: &str) -> Result<HostView<'s>> {
    sources
        .get(p)
        .copied()
        .flatten()
        .ok_or_else(|| Error::backend("gather", format!("{what} of parameter {p} is missing")))
}

fn gather_job<'a, 's: 'a, T: Float>(
    job: &mut GatherJob<'a, 's, CpuBackend>,
    tasks: &mut Vec<(u64, GatherTask<'a, T>)>,
) -> Result<()> {
    let table: &'a CpuBlockTable = job.table;
    check_select("gather", job.select, table.entries.len())?;
    let out = typed_mut::<T>(take_mut(&mut job.out), "gather")?;
    let mut keep = vec![job.select.is_none(); table.entries.len()];
    for &i in job.select.unwrap_or(&[]) {
        keep[i as usize] = true;
    }
    for (i, chunk) in table.packed_chunks(out)? {
        if !keep[i] {
            continue;
        }
        let e = &table.entries[i];
        let src = typed::<T>(param_view(job.sources, e.param, "source")?, "gather")?;
        if src.len() < table.extent[e.param] {
            return Err(Error::backend(
                "gather",
                format!("parameter {} is too short", e.param),
            ));
        }
        let add = match job.add {
            Some((tensors, coef)) => {
                let a = typed::<T>(param_view(tensors, e.param, "added tensor")?, "gather")?;
                if a.len() < table.extent[e.param] {
                    return Err(Error::backend("gather", "added tensor is too short"));
                }
                Some((a, T::from_f64(coef)))
            }
            None => None,
        };
        tasks.push((
            e.numel as u64,
            GatherTask {
                entry: e,
                out: chunk,
                src,
                add,
            },
        ));
    }
    Ok(())
}

pub(super) fn gather(be: &CpuBackend, jobs: &mut [GatherJob<'_, '_, CpuBackend>]) -> Result<()> {
    let mut t32 = Vec::new();
    let mut t64 = Vec::new();
    for job in jobs.iter_mut() {
        match job.out.dtype() {
            DType::F32 => gather_job::<f32>(job, &mut t32)?,
            DType::F64 => gather_job::<f64>(job, &mut t64)?,
        }
    }
    be.run(t32, gather_task, t64, gather_task);
    Ok(())
}

/// A raw pointer that may cross threads.
#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
// SAFETY: the pointer is only dereferenced for disjoint runs of one
// parameter (checked when the table was built), one task per block.
unsafe impl<T: Send> Send for SendPtr<T> {}
// SAFETY: as above; tasks never touch the same element.
unsafe impl<T: Send> Sync for SendPtr<T> {}

struct ScatterTask<'a, T> {
    entry: &'a Entry,
    dst: SendPtr<T>,
    src: &'a [T],
    add: bool,
}

fn scatter_task<T: Float>(t: ScatterTask<'_, T>) {
    let packed = &t.src[t.entry.packed_offset..t.entry.packed_offset + t.entry.numel];
    for &Run {
        src: dst,
        dst: off,
        len,
        step,
    } in &t.entry.runs
    {
        let s = &packed[off..off + len];
        if step != 1 {
            for (j, &x) in s.iter().enumerate() {
                // SAFETY: as below, element by element: every offset of a
                // strided run is within the parameter (its extent is the
                // whole parameter) and no other entry touches it (the map
                // to memory is one to one).
                let o = unsafe { &mut *t.dst.0.add(dst + j * step) };
                if t.add {
                    *o += x;
                } else {
                    *o = x;
                }
            }
            continue;
        }
        // SAFETY: `dst + len` is within the parameter (checked against the
        // table's extent before the task was created), and the runs of
        // different entries never overlap (checked when the table was
        // built), so this task is the only one writing these elements.
        let out = unsafe { std::slice::from_raw_parts_mut(t.dst.0.add(dst), len) };
        if t.add {
            super::kernels::add(out, s);
        } else {
            out.copy_from_slice(s);
        }
    }
}

fn scatter_job<'a, T: Float>(
    job: &mut ScatterJob<'a, CpuBackend>,
    tasks: &mut Vec<(u64, ScatterTask<'a, T>)>,
) -> Result<()> {
    let table: &'a CpuBlockTable = job.table;
    let dst = typed_mut::<T>(take_mut(&mut job.dst), "scatter")?;
    let src = typed::<T>(job.source, "scatter")?;
    if table.extent.iter().any(|&e| e > dst.len()) {
        return Err(Error::backend(
            "scatter",
            "parameter shorter than its blocks",
        ));
    }
    if table
        .entries
        .iter()
        .any(|e| e.packed_offset + e.numel > src.len())
    {
        return Err(Error::backend(
            "scatter",
            "packed directions shorter than the table",
        ));
    }
    let ptr = SendPtr(dst.as_mut_ptr());
    for e in &table.entries {
        tasks.push((
            e.numel as u64,
            ScatterTask {
                entry: e,
                dst: ptr,
                src,
                add: job.add,
            },
        ));
    }
    Ok(())
}

pub(super) fn scatter(be: &CpuBackend, jobs: &mut [ScatterJob<'_, CpuBackend>]) -> Result<()> {
    let mut t32 = Vec::new();
    let mut t64 = Vec::new();
    for job in jobs.iter_mut() {
        match job.source.dtype() {
            DType::F32 => scatter_job::<f32>(job, &mut t32)?,
            DType::F64 => scatter_job::<f64>(job, &mut t64)?,
        }
    }
    be.run(t32, scatter_task, t64, scatter_task);
    Ok(())
}

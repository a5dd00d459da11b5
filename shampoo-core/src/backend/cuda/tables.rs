//! Small device tables that stay the same from step to step (the block
//! records of a gather or scatter, the pointer arrays of a batched GEMM),
//! uploaded the first time they are asked for and reused after: a steady
//! step issues no copy for them. Keyed by their contents, so a caller whose
//! tensors move (new addresses) gets a new table, never a stale one.

use std::collections::HashMap;

use cudarc::driver::{result as drv, sys as dsys};

use crate::{Error, Result};

/// Tables kept before the cache is emptied (a caller whose addresses change
/// every step would otherwise grow it without bound). A root-inverse step
/// of the batched Newton iteration on ResNet-50 uses about 500 (its
/// products alternate between buffers); each is a few kilobytes.
const MAX_TABLES: usize = 4096;

/// Device copies of word tables.
#[derive(Default)]
pub(super) struct Cache {
    tables: HashMap<Vec<u64>, u64>,
}

// SAFETY: the addresses are device memory of the backend's context, used
// only under the backend's mutex.
unsafe impl Send for Cache {}

impl Cache {
    /// The device address of a copy of `words`.
    pub(super) fn get(&mut self, words: Vec<u64>, stream: dsys::CUstream) -> Result<u64> {
        if let Some(&p) = self.tables.get(&words) {
            return Ok(p);
        }
        if self.tables.len() >= MAX_TABLES {
            // Work queued with the old tables finishes first.
            // SAFETY: the stream is the backend's, valid and current.
            unsafe { drv::stream::synchronize(stream) }
                .map_err(|e| Error::backend("device table", e))?;
            self.clear();
        }
        let bytes = 8 * words.len().max(1);
        // SAFETY: a plain device allocation, filled below.
        let p = unsafe { drv::malloc_sync(bytes) }
            .map_err(|e| Error::backend("device table", format!("{bytes} bytes: {e}")))?;
        // SAFETY: `p` holds `bytes` bytes; a copy from pageable memory has
        // read the host words when it returns.
        unsafe { drv::memcpy_htod_async(p, &words, stream) }
            .map_err(|e| Error::backend("device table", e))?;
        self.tables.insert(words, p);
        Ok(p)
    }

    fn clear(&mut self) {
        for (_, p) in self.tables.drain() {
            // SAFETY: allocated in `get`, freed once; cuMemFree waits for
            // work still using it.
            let _ = unsafe { drv::free_sync(p) };
        }
    }
}

impl Drop for Cache {
    fn drop(&mut self) {
        self.clear();
    }
}

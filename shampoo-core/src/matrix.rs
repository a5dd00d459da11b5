//! Small helpers on host matrices shared by the CPU backend and the
//! checkpoint code.

/// Tile edge of [`mirror_lower`]: two 32 x 32 f64 tiles fit in L1.
const TILE: usize = 32;

/// Copies the lower triangle of a row-major `n x n` matrix onto its upper
/// triangle, tile by tile (a column walk misses the cache on every element).
pub(crate) fn mirror_lower<T: Copy>(x: &mut [T], n: usize) {
    for i0 in (0..n).step_by(TILE) {
        for j0 in (0..=i0).step_by(TILE) {
            let i1 = (i0 + TILE).min(n);
            let j1 = (j0 + TILE).min(n);
            for i in i0..i1 {
                for j in j0..j1.min(i) {
                    x[j * n + i] = x[i * n + j];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn mirror_matches_the_definition_across_tile_edges() {
        for n in [0usize, 1, 2, 31, 32, 33, 65, 100] {
            let mut x: Vec<u32> = (0..(n * n) as u32).collect();
            let orig = x.clone();
            super::mirror_lower(&mut x, n);
            for i in 0..n {
                for j in 0..n {
                    let (r, c) = if j <= i { (i, j) } else { (j, i) };
                    assert_eq!(x[i * n + j], orig[r * n + c], "n {n} at ({i}, {j})");
                }
            }
        }
    }
}

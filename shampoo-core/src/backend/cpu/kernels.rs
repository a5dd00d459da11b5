//! Vectorizable elementwise loops, compiled for several SIMD levels and
//! picked at run time (`multiversion`). Each loop does the arithmetic of
//! one [`Map`](crate::backend::Map) stage in the published order of
//! operations; floating-point operations are never contracted or
//! reassociated, so every SIMD level gives the same bits. Sums add in a
//! fixed order (sixteen lanes), so they do not depend on the vector width
//! either.

use multiversion::multiversion;

use crate::Float;

/// `v = v * beta; v += (coef * g) * g`.
#[multiversion(targets = "simd")]
pub fn ema_square<T: Float>(v: &mut [T], g: &[T], beta: T, coef: T) {
    for (v, &g) in v.iter_mut().zip(g) {
        let mut t = *v * beta;
        t += coef * g * g;
        *v = t;
    }
}

/// `v += g * g`.
#[multiversion(targets = "simd")]
pub fn add_square<T: Float>(v: &mut [T], g: &[T]) {
    for (v, &g) in v.iter_mut().zip(g) {
        *v += g * g;
    }
}

/// `m = m * beta; m += coef * g; out = m / divisor`.
#[multiversion(targets = "simd")]
pub fn ema_divided<T: Float>(m: &mut [T], out: &mut [T], g: &[T], beta: T, coef: T, divisor: T) {
    for ((m, o), &g) in m.iter_mut().zip(out.iter_mut()).zip(g) {
        let mut t = *m * beta;
        t += coef * g;
        *m = t;
        *o = t / divisor;
    }
}

/// Lion's filtered gradient: `out = (b3 m + c3 g) / divisor` with the old
/// `m`, then `m = b1 m + c1 g` (each sum in two roundings).
#[multiversion(targets = "simd")]
pub fn interpolate_then_ema<T: Float>(
    m: &mut [T],
    out: &mut [T],
    g: &[T],
    [b3, c3]: [T; 2],
    [b1, c1]: [T; 2],
    divisor: T,
) {
    for ((m, o), &g) in m.iter_mut().zip(out.iter_mut()).zip(g) {
        let mut f = *m * b3;
        f += c3 * g;
        *o = f / divisor;
        let mut t = *m * b1;
        t += c1 * g;
        *m = t;
    }
}

/// `out = g / (sqrt(v / divisor) + eps)` (`divisor = 1` skips nothing: the
/// division by one is exact).
#[multiversion(targets = "simd")]
pub fn adaptive<T: Float>(out: &mut [T], g: &[T], v: &[T], divisor: T, eps: T) {
    for ((o, &g), &v) in out.iter_mut().zip(g).zip(v) {
        *o = g / ((v / divisor).sqrt() + eps);
    }
}

/// `out = g / (sqrt(v) + eps)`.
#[multiversion(targets = "simd")]
pub fn adaptive_sqrt<T: Float>(out: &mut [T], g: &[T], v: &[T], eps: T) {
    for ((o, &g), &v) in out.iter_mut().zip(g).zip(v) {
        *o = g / (v.sqrt() + eps);
    }
}

const LANES: usize = 16;
const CHUNK: usize = 256;

/// Adds the lanes pairwise in float64.
#[inline(always)]
fn fold_lanes<T: Float>(acc: [T; LANES]) -> f64 {
    let mut w = [0.0f64; LANES];
    for (w, a) in w.iter_mut().zip(acc) {
        *w = a.to_f64();
    }
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for l in 0..width {
            w[l] += w[l + width];
        }
    }
    w[0]
}

/// Sums `f(a, b)^2` over paired elements: sixteen lanes in the data's
/// precision within chunks of 256 elements, chunk sums in float64. The
/// order of additions is fixed, so every SIMD level gives the same result.
#[inline(always)]
fn chunked_sum_squares<T: Float>(a: &[T], b: &[T], f: impl Fn(T, T) -> T) -> f64 {
    let mut total = 0.0f64;
    for (ca, cb) in a.chunks(CHUNK).zip(b.chunks(CHUNK)) {
        let mut acc = [T::ZERO; LANES];
        let (la, lb) = (ca.chunks_exact(LANES), cb.chunks_exact(LANES));
        let (ra, rb) = (la.remainder(), lb.remainder());
        for (xa, xb) in la.zip(lb) {
            let xa: &[T; LANES] = xa.try_into().expect("lane chunk");
            let xb: &[T; LANES] = xb.try_into().expect("lane chunk");
            for l in 0..LANES {
                let q = f(xa[l], xb[l]);
                acc[l] += q * q;
            }
        }
        for (l, (&x, &y)) in ra.iter().zip(rb).enumerate() {
            let q = f(x, y);
            acc[l] += q * q;
        }
        total += fold_lanes(acc);
    }
    total
}

/// `sum x^2`.
#[multiversion(targets = "simd")]
pub fn sum_squares<T: Float>(x: &[T]) -> f64 {
    chunked_sum_squares(x, x, |a, _| a)
}

/// `out = x * s`.
#[multiversion(targets = "simd")]
pub fn scaled<T: Float>(out: &mut [T], x: &[T], s: T) {
    for (o, &x) in out.iter_mut().zip(x) {
        *o = x * s;
    }
}

/// `x *= s`.
#[multiversion(targets = "simd")]
pub fn scale<T: Float>(x: &mut [T], s: T) {
    for x in x.iter_mut() {
        *x *= s;
    }
}

/// `x += c * w`.
#[multiversion(targets = "simd")]
pub fn add_scaled<T: Float>(x: &mut [T], w: &[T], c: T) {
    for (x, &w) in x.iter_mut().zip(w) {
        *x += c * w;
    }
}

/// Classic momentum: `b = b * mu; b += keep * p`, then `p = b`, or
/// `p = keep * p + mu * b` (Nesterov).
#[multiversion(targets = "simd")]
pub fn momentum<T: Float>(p: &mut [T], b: &mut [T], mu: T, keep: T, nesterov: bool) {
    if nesterov {
        for (p, b) in p.iter_mut().zip(b.iter_mut()) {
            let mut nb = *b * mu;
            nb += keep * *p;
            *b = nb;
            *p = keep * *p + mu * nb;
        }
    } else {
        for (p, b) in p.iter_mut().zip(b.iter_mut()) {
            let mut nb = *b * mu;
            nb += keep * *p;
            *b = nb;
            *p = nb;
        }
    }
}

/// `x += y`.
#[multiversion(targets = "simd")]
pub fn add<T: Float>(x: &mut [T], y: &[T]) {
    for (x, &y) in x.iter_mut().zip(y) {
        *x += y;
    }
}

/// `sum (g / (sqrt(v / divisor) + eps))^2`.
#[multiversion(targets = "simd")]
pub fn adaptive_sum_squares<T: Float>(g: &[T], v: &[T], divisor: T, eps: T) -> f64 {
    chunked_sum_squares(g, v, |g, v| g / ((v / divisor).sqrt() + eps))
}

/// `sum (g / (sqrt(v) + eps))^2`.
#[multiversion(targets = "simd")]
pub fn adaptive_sqrt_sum_squares<T: Float>(g: &[T], v: &[T], eps: T) -> f64 {
    chunked_sum_squares(g, v, |g, v| g / (v.sqrt() + eps))
}

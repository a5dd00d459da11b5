// The 16-bit communication formats (bf16, IEEE half) of the direction
// all-gather: packing values into 16 bits and widening them back.
//
// Integer arithmetic on bit patterns only (no floating-point types, no
// intrinsics), the algorithm of shampoo-core/src/backend/cpu/wire.rs: a
// value sig * 2^e is re-quantised to the target's quantum 2^t,
// t = max(E, emin) - m, rounding the dropped bits to nearest, ties to even;
// the target pattern is ((t + m + bias - 1) << m) + q, which also covers
// subnormals and a round-up into the next binade; from the all-ones
// exponent up it is infinity. NaNs stay NaNs (quiet bit set, sign and
// leading payload bits kept).

#define WIRE_BF16 0
#define WIRE_F16 1

// The pattern `bits` of a format with fm mantissa and fe exponent bits,
// converted to one with tm and te.
__device__ __forceinline__ u64 wire_convert(u64 bits, int fm, int fe, int tm, int te) {
    long long fbias = (1LL << (fe - 1)) - 1, tbias = (1LL << (te - 1)) - 1;
    u64 sign = (bits >> (fm + fe)) & 1;
    long long exp = (long long)((bits >> fm) & ((1ULL << fe) - 1));
    u64 man = bits & ((1ULL << fm) - 1);
    u64 tsign = sign << (tm + te);
    u64 tinf = ((1ULL << te) - 1) << tm;
    if (exp == (1LL << fe) - 1) {
        if (man == 0) {
            return tsign | tinf;
        }
        u64 payload = tm >= fm ? man << (tm - fm) : man >> (fm - tm);
        return tsign | tinf | (1ULL << (tm - 1)) | payload;
    }
    if (exp == 0 && man == 0) {
        return tsign;
    }
    u64 sig;
    long long e;
    int top;
    if (exp == 0) {
        sig = man;
        e = 1 - fbias - fm;
        top = 0;
        while ((sig >> (top + 1)) != 0) {
            ++top;
        }
    } else {
        sig = man | (1ULL << fm);
        e = exp - fbias - fm;
        top = fm;
    }
    long long big = e + top, emin = 1 - tbias;
    long long t = (big > emin ? big : emin) - tm;
    long long shift = t - e;
    u64 q;
    if (shift <= 0) {
        q = sig << (-shift);
    } else if (shift >= 64) {
        q = 0;
    } else {
        q = sig >> shift;
        u64 rem = sig & ((1ULL << shift) - 1), half = 1ULL << (shift - 1);
        if (rem > half || (rem == half && (q & 1) != 0)) {
            q += 1;
        }
    }
    long long biased = t + tm + tbias - 1;
    if (biased >= (1LL << te) - 1) {
        return tsign | tinf;
    }
    u64 out = ((u64)biased << tm) + q;
    return tsign | (out < tinf ? out : tinf);
}

__device__ __forceinline__ int wire_mant(u64 format) { return format == WIRE_BF16 ? 7 : 10; }
__device__ __forceinline__ int wire_exp(u64 format) { return format == WIRE_BF16 ? 8 : 5; }

// wire[i] = round16(src[i]) for i < n, 0 for n <= i < slots. `src` holds
// the values' bit patterns (sm mantissa, se exponent bits).
template <typename B>
__device__ void pack16(const B* src, unsigned short* wire, u64 n, u64 slots, u64 format, int sm,
                       int se) {
    int m = wire_mant(format), e = wire_exp(format);
    GRID_LOOP(i, slots) {
        wire[i] = i < n ? (unsigned short)wire_convert((u64)src[i], sm, se, m, e) : 0;
    }
}

// dst[i] = widen(wire[i]) for i < n.
template <typename B>
__device__ void unpack16(const unsigned short* wire, B* dst, u64 n, u64 format, int dm, int de) {
    int m = wire_mant(format), e = wire_exp(format);
    GRID_LOOP(i, n) { dst[i] = (B)wire_convert((u64)wire[i], m, e, dm, de); }
}

#define INSTANTIATE(B, S, MANT, EXP)                                                             \
    extern "C" __global__ void pack16_##S(const B* src, unsigned short* wire, u64 n, u64 slots,  \
                                          u64 format) {                                          \
        pack16<B>(src, wire, n, slots, format, MANT, EXP);                                       \
    }                                                                                            \
    extern "C" __global__ void unpack16_##S(const unsigned short* wire, B* dst, u64 n,           \
                                            u64 format) {                                        \
        unpack16<B>(wire, dst, n, format, MANT, EXP);                                            \
    }

INSTANTIATE(unsigned int, f32, 23, 8)
INSTANTIATE(u64, f64, 52, 11)

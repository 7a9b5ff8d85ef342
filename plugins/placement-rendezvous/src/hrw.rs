//! The arithmetic of weighted rendezvous hashing, bit-for-bit the same on every platform.
//!
//! * [`key_hash`]: FNV-1a 64 over a length-framed encoding of (space, chunk name, host id),
//!   finished with the splitmix64 finalizer so that every output bit depends on every input
//!   bit.
//! * [`unit()`]: the top 52 bits of the hash as a number strictly inside (0, 1).
//! * [`score`]: `weight / -ln(unit)`, the standard weighted-HRW score (Schindelhauer &
//!   Schomaker; the host with the highest score wins, with probability `weight / Σ weights`).
//!
//! The natural logarithm is computed here ([`ln_unit`]) with IEEE-754 basic operations only
//! (`+ - * /`, each correctly rounded, never fused), not with the platform's libm, so a native
//! build (the runtime's benchmark) and the wasm component order hosts identically.

/// FNV-1a 64-bit offset basis.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV-1a 64-bit prime.
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// The splitmix64 finalizer (Steele, Lea & Flood 2014).
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The rendezvous hash of a chunk on a host.
///
/// `mix64(FNV-1a-64(le64(len(space)) ‖ space ‖ le64(len(name)) ‖ name ‖ le64(len(host)) ‖
/// host))`, where `le64` is the length in bytes as 8 little-endian bytes (so `("ab", "c")`
/// and `("a", "bc")` hash differently).
pub fn key_hash(space: &str, name: &str, host: &str) -> u64 {
    let mut h = FNV_OFFSET;
    for field in [space, name, host] {
        h = fnv1a(h, &(field.len() as u64).to_le_bytes());
        h = fnv1a(h, field.as_bytes());
    }
    mix64(h)
}

/// `((hash >> 12) + 0.5) / 2^52`: uniform in (0, 1), never 0 or 1.
pub fn unit(hash: u64) -> f64 {
    // Exact: both terms need at most 53 significant bits.
    ((hash >> 12) as f64 + 0.5) * (1.0 / (1u64 << 52) as f64)
}

/// The natural logarithm of `u` in (0, 1), from basic IEEE-754 operations only.
///
/// `u = m · 2^e` with `m` in (√½, √2]; `ln m = 2·atanh(s)` with `s = (m - 1)/(m + 1)`,
/// `|s| ≤ 0.1716`, summed to 13 terms (error below 1e-17 relative to the result).
pub fn ln_unit(u: f64) -> f64 {
    debug_assert!(u > 0.0 && u < 1.0 && u.is_normal());
    let bits = u.to_bits();
    let mut exponent = ((bits >> 52) & 0x7ff) as i64 - 1023;
    let mut m = f64::from_bits((bits & ((1u64 << 52) - 1)) | (1023u64 << 52));
    if m > core::f64::consts::SQRT_2 {
        m *= 0.5; // exact
        exponent += 1;
    }
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    // 2s(1 + s²/3 + s⁴/5 + ... + s²⁴/25), Horner from the innermost term.
    let mut sum = 0.0;
    let mut k = 25.0;
    while k > 1.0 {
        sum = (sum + 1.0 / k) * s2;
        k -= 2.0;
    }
    exponent as f64 * core::f64::consts::LN_2 + 2.0 * s * (1.0 + sum)
}

/// The weighted-HRW score of a host for a chunk: `weight / -ln(unit(hash))`. Positive and
/// finite for a positive finite weight; higher wins.
pub fn score(hash: u64, weight: f64) -> f64 {
    weight / -ln_unit(unit(hash))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_the_published_vectors() {
        assert_eq!(fnv1a(FNV_OFFSET, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(FNV_OFFSET, b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn key_hash_is_pinned() {
        // Changing these values reshuffles every placement in every cluster: don't.
        assert_eq!(
            key_hash("space", "chunk", "host"),
            KEY_HASH_SPACE_CHUNK_HOST
        );
        assert_ne!(key_hash("ab", "c", "h"), key_hash("a", "bc", "h"));
    }

    // Computed independently (Python) from the definition in the docs.
    const KEY_HASH_SPACE_CHUNK_HOST: u64 = 0x785a_e347_369a_4270;

    #[test]
    fn unit_is_strictly_inside_zero_one() {
        for h in [0, 1, 4095, 4096, u64::MAX, u64::MAX - 4096, 1 << 63] {
            let u = unit(h);
            assert!(u > 0.0 && u < 1.0, "{h:#x} -> {u}");
        }
    }

    #[test]
    fn ln_unit_agrees_with_libm() {
        let mut h = 1u64;
        for _ in 0..100_000 {
            h = mix64(h.wrapping_add(0x9e37_79b9_7f4a_7c15));
            let u = unit(h);
            let (ours, libm) = (ln_unit(u), u.ln());
            assert!(
                ((ours - libm) / libm).abs() < 4.0 * f64::EPSILON,
                "u={u}: {ours} vs {libm}"
            );
        }
        for u in [
            unit(0),
            unit(u64::MAX),
            0.5,
            0.25,
            core::f64::consts::FRAC_1_SQRT_2,
            0.999,
        ] {
            let (ours, libm) = (ln_unit(u), u.ln());
            assert!(((ours - libm) / libm).abs() < 4.0 * f64::EPSILON, "u={u}");
            assert!(ours < 0.0);
        }
    }

    #[test]
    fn score_orders_by_weight_for_the_same_hash() {
        let h = key_hash("s", "c", "h");
        assert!(score(h, 2.0) > score(h, 1.0));
        assert!(score(u64::MAX, 1.0).is_finite());
        assert!(score(0, 1.0) > 0.0);
    }
}

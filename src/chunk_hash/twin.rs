//! Two SHA-256 computations over the same bytes, at roughly the cost of one.
//!
//! The chunkstream daemon hashes every uploaded chunk twice: into the chunk's
//! own SHA-256 and into the running SHA-256 of the whole file. Two sequential
//! passes cost twice the CPU time, although a single SHA-NI stream leaves the
//! core mostly idle: each `sha256rnds2` waits for the previous one. This module
//! steps both states through the rounds together, interleaving two independent
//! `sha256rnds2` chains that fill each other's latency, and computes the message
//! schedule (`sha256msg1`/`sha256msg2`) once per block for both, since both
//! states consume the same block. On the target machine (AMD EPYC) that hashes
//! into two states at about the speed of one ordinary pass.
//!
//! [`Sha256State`] is a SHA-256 computation in a form we own, so it can be
//! checkpointed with [`Sha256State::to_bytes`] and resumed with
//! [`Sha256State::from_bytes`]. [`update_both`] feeds the same bytes to two of
//! them, with the twin kernel when the CPU has the SHA extensions and the two
//! states' block boundaries line up, and with two ordinary
//! [`Sha256State::update`] calls (via [`sha2::block_api::compress256`])
//! otherwise. Targets other than `x86_64` only build that fallback.

use sha2::block_api::compress256;

/// SHA-256 initial hash value (FIPS 180-4, 5.3.3).
const H0: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

/// Size of the serialized form without pending bytes: 32 bytes of state
/// words and 8 bytes of length.
const HEADER_LEN: usize = 40;

/// A SHA-256 computation in progress in a form we own: the eight state words,
/// the bytes hashed so far, and the bytes of an unfinished 64-byte block.
///
/// Invariant: `pending.len() == length % 64`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sha256State {
    /// Chaining value after all the whole blocks hashed so far.
    words: [u32; 8],
    /// Number of bytes hashed so far, including `pending` (modulo 2^64).
    length: u64,
    /// Bytes of the unfinished block, fewer than 64.
    pending: Vec<u8>,
}

impl Default for Sha256State {
    fn default() -> Self {
        Self::new()
    }
}

impl Sha256State {
    /// The state of a SHA-256 computation that has hashed nothing yet.
    pub fn new() -> Self {
        Self {
            words: H0,
            length: 0,
            pending: Vec::new(),
        }
    }

    /// Hashes `bytes` into this state.
    pub fn update(&mut self, bytes: &[u8]) {
        self.length = self.length.wrapping_add(bytes.len() as u64);
        let rest = self.fill_pending(bytes);
        let (blocks, tail) = rest.as_chunks::<64>();
        compress256(&mut self.words, blocks);
        self.pending.extend_from_slice(tail);
    }

    /// The SHA-256 digest of the bytes hashed so far. The state is left as it
    /// is, so hashing can go on afterwards.
    pub fn finalize(&self) -> [u8; 32] {
        let mut words = self.words;
        let n = self.pending.len();
        let mut tail = [0u8; 128];
        tail[..n].copy_from_slice(&self.pending);
        tail[n] = 0x80;
        let end = if n < 56 { 64 } else { 128 };
        let bit_length = self.length.wrapping_mul(8);
        tail[end - 8..end].copy_from_slice(&bit_length.to_be_bytes());
        compress256(&mut words, tail[..end].as_chunks::<64>().0);
        let mut digest = [0u8; 32];
        for (out, word) in digest.chunks_exact_mut(4).zip(words) {
            out.copy_from_slice(&word.to_be_bytes());
        }
        digest
    }

    /// Serializes the state: the 8 state words (32 bytes, each big-endian),
    /// the number of bytes hashed so far (8 bytes, big-endian), then the
    /// pending bytes (`length % 64` of them). 40 to 103 bytes in all.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.pending.len());
        for word in self.words {
            out.extend_from_slice(&word.to_be_bytes());
        }
        out.extend_from_slice(&self.length.to_be_bytes());
        out.extend_from_slice(&self.pending);
        out
    }

    /// Parses the output of [`to_bytes`](Self::to_bytes). Returns `None` if
    /// `bytes` is shorter than 40 bytes or the number of pending bytes after
    /// the header is not the stored length modulo 64.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let (words_bytes, rest) = bytes.split_first_chunk::<32>()?;
        let (length_bytes, pending) = rest.split_first_chunk::<8>()?;
        let length = u64::from_be_bytes(*length_bytes);
        if pending.len() as u64 != length % 64 {
            return None;
        }
        let word_bytes = words_bytes.as_chunks::<4>().0;
        Some(Self {
            words: core::array::from_fn(|i| u32::from_be_bytes(word_bytes[i])),
            length,
            pending: pending.to_vec(),
        })
    }

    /// Moves the start of `bytes` into a non-empty pending block, compresses
    /// the block if that completes it, and returns the bytes not taken. Does
    /// not touch `length`.
    fn fill_pending<'a>(&mut self, bytes: &'a [u8]) -> &'a [u8] {
        if self.pending.is_empty() {
            return bytes;
        }
        let take = (64 - self.pending.len()).min(bytes.len());
        let (head, rest) = bytes.split_at(take);
        self.pending.extend_from_slice(head);
        if let Ok(block) = <[u8; 64]>::try_from(self.pending.as_slice()) {
            compress256(&mut self.words, &[block]);
            self.pending.clear();
        }
        rest
    }
}

/// Hashes `bytes` into both states: the same bytes, two computations. Uses the
/// shared-schedule SHA-NI kernel when the CPU has it (runtime detection with
/// `std::arch::is_x86_feature_detected!("sha")` and "sse4.1", cached), and two
/// `update` calls otherwise or when the two states' pending lengths differ.
pub fn update_both(first: &mut Sha256State, second: &mut Sha256State, bytes: &[u8]) {
    update_both_with(first, second, bytes, true);
}

/// [`update_both`], with the twin kernel allowed only if `allow_sha_ni`
/// (tests pass `false` to force the fallback). Returns whether the twin kernel
/// was used.
fn update_both_with(
    first: &mut Sha256State,
    second: &mut Sha256State,
    bytes: &[u8],
    allow_sha_ni: bool,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if allow_sha_ni && first.pending.len() == second.pending.len() && has_sha_ni() {
        let n = bytes.len() as u64;
        first.length = first.length.wrapping_add(n);
        second.length = second.length.wrapping_add(n);
        // Same pending length, so both take the same number of bytes (their
        // pending blocks may still differ and are compressed separately).
        let rest = first.fill_pending(bytes);
        second.fill_pending(bytes);
        let (blocks, tail) = rest.as_chunks::<64>();
        // SAFETY: `has_sha_ni` just checked that the CPU supports the `sha`
        // and `sse4.1` target features that `shani::compress_twice` enables.
        unsafe { shani::compress_twice(&mut first.words, &mut second.words, blocks) };
        first.pending.extend_from_slice(tail);
        second.pending.extend_from_slice(tail);
        return true;
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = allow_sha_ni;
    first.update(bytes);
    second.update(bytes);
    false
}

/// Compresses whole `blocks` into both chaining values `a` and `b`, like two
/// [`compress256`] calls, with the shared-schedule SHA-NI kernel when the CPU
/// has it. The daemon goes through [`update_both`]; tests check the kernel
/// against `compress256` directly.
#[cfg(test)]
fn compress_twice(a: &mut [u32; 8], b: &mut [u32; 8], blocks: &[[u8; 64]]) {
    #[cfg(target_arch = "x86_64")]
    if has_sha_ni() {
        // SAFETY: `has_sha_ni` just checked that the CPU supports the `sha`
        // and `sse4.1` target features that `shani::compress_twice` enables.
        unsafe { shani::compress_twice(a, b, blocks) };
        return;
    }
    compress256(a, blocks);
    compress256(b, blocks);
}

/// Whether the CPU has the SHA extensions and SSE4.1. The standard library
/// caches the CPUID probe in a static, so this is two relaxed atomic loads.
#[cfg(target_arch = "x86_64")]
fn has_sha_ni() -> bool {
    std::arch::is_x86_feature_detected!("sha") && std::arch::is_x86_feature_detected!("sse4.1")
}

/// The SHA-NI kernel, adapted from the `x86_sha` backend of the `sha2` crate
/// 0.11.1 (RustCrypto, MIT OR Apache-2.0): the same round structure, but the
/// message schedule of each block is computed once and fed to two
/// independent `sha256rnds2` chains, interleaved so that they overlap in the
/// pipeline (one chain alone is bound by the instruction's latency).
#[cfg(target_arch = "x86_64")]
mod shani {
    use core::arch::x86_64::*;

    #[rustfmt::skip]
    const K32: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
        0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
        0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
        0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
        0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
        0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
        0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
    ];

    /// One SHA-256 state in the register layout `sha256rnds2` wants.
    #[derive(Clone, Copy)]
    struct Lanes {
        abef: __m128i,
        cdgh: __m128i,
    }

    #[inline]
    #[target_feature(enable = "sha,sse4.1")]
    fn to_lanes(state: &[u32; 8]) -> Lanes {
        let s = state.map(|x| x as i32);
        let dcba = _mm_set_epi32(s[3], s[2], s[1], s[0]);
        let hgfe = _mm_set_epi32(s[7], s[6], s[5], s[4]);
        let cdab = _mm_shuffle_epi32(dcba, 0xB1);
        let efgh = _mm_shuffle_epi32(hgfe, 0x1B);
        Lanes {
            abef: _mm_alignr_epi8(cdab, efgh, 8),
            cdgh: _mm_blend_epi16(efgh, cdab, 0xF0),
        }
    }

    #[inline]
    #[target_feature(enable = "sha,sse4.1")]
    fn from_lanes(lanes: Lanes, state: &mut [u32; 8]) {
        let feba = _mm_shuffle_epi32(lanes.abef, 0x1B);
        let dchg = _mm_shuffle_epi32(lanes.cdgh, 0xB1);
        let dcba = _mm_blend_epi16(feba, dchg, 0xF0);
        let hgfe = _mm_alignr_epi8(dchg, feba, 8);
        *state = [
            _mm_extract_epi32(dcba, 0),
            _mm_extract_epi32(dcba, 1),
            _mm_extract_epi32(dcba, 2),
            _mm_extract_epi32(dcba, 3),
            _mm_extract_epi32(hgfe, 0),
            _mm_extract_epi32(hgfe, 1),
            _mm_extract_epi32(hgfe, 2),
            _mm_extract_epi32(hgfe, 3),
        ]
        .map(|x| x as u32);
    }

    /// Four rounds (index `r` of 16) on both states with the same schedule words.
    #[inline]
    #[target_feature(enable = "sha,sse4.1")]
    fn rounds4(r: usize, a: &mut Lanes, b: &mut Lanes, w: __m128i) {
        let rk = _mm_set_epi32(
            K32[4 * r + 3] as i32,
            K32[4 * r + 2] as i32,
            K32[4 * r + 1] as i32,
            K32[4 * r] as i32,
        );
        let t1 = _mm_add_epi32(w, rk);
        let t2 = _mm_shuffle_epi32(t1, 0x0E);
        a.cdgh = _mm_sha256rnds2_epu32(a.cdgh, a.abef, t1);
        b.cdgh = _mm_sha256rnds2_epu32(b.cdgh, b.abef, t1);
        a.abef = _mm_sha256rnds2_epu32(a.abef, a.cdgh, t2);
        b.abef = _mm_sha256rnds2_epu32(b.abef, b.cdgh, t2);
    }

    /// Sixteen rounds starting at round-group `r`, extending the schedule in `w`.
    #[inline]
    #[target_feature(enable = "sha,sse4.1")]
    fn schedule_rounds16(r: usize, a: &mut Lanes, b: &mut Lanes, w: &mut [__m128i; 4]) {
        for i in 0..4 {
            let w0 = w[i];
            let w1 = w[(i + 1) % 4];
            let w2 = w[(i + 2) % 4];
            let w3 = w[(i + 3) % 4];
            let t1 = _mm_sha256msg1_epu32(w0, w1);
            let t2 = _mm_alignr_epi8(w3, w2, 4);
            let t3 = _mm_add_epi32(t1, t2);
            w[i] = _mm_sha256msg2_epu32(t3, w3);
            rounds4(r + i, a, b, w[i]);
        }
    }

    /// Loads a block as four big-endian word vectors.
    #[inline]
    #[target_feature(enable = "sha,sse4.1")]
    fn load_block(block: &[u8; 64]) -> [__m128i; 4] {
        let mask = _mm_set_epi64x(0x0C0D_0E0F_0809_0A0B, 0x0405_0607_0001_0203);
        core::array::from_fn(|i| {
            let half = |j: usize| {
                let at = 16 * i + 8 * j;
                i64::from_le_bytes(block[at..at + 8].try_into().expect("8 bytes"))
            };
            _mm_shuffle_epi8(_mm_set_epi64x(half(1), half(0)), mask)
        })
    }

    /// Compresses `blocks` into both states, computing the schedule once.
    #[target_feature(enable = "sha,sse4.1")]
    pub(super) fn compress_twice(a: &mut [u32; 8], b: &mut [u32; 8], blocks: &[[u8; 64]]) {
        let mut la = to_lanes(a);
        let mut lb = to_lanes(b);
        for block in blocks {
            let (sa, sb) = (la, lb);
            let mut w = load_block(block);
            for (r, &wr) in w.iter().enumerate() {
                rounds4(r, &mut la, &mut lb, wr);
            }
            schedule_rounds16(4, &mut la, &mut lb, &mut w);
            schedule_rounds16(8, &mut la, &mut lb, &mut w);
            schedule_rounds16(12, &mut la, &mut lb, &mut w);
            la.abef = _mm_add_epi32(la.abef, sa.abef);
            la.cdgh = _mm_add_epi32(la.cdgh, sa.cdgh);
            lb.abef = _mm_add_epi32(lb.abef, sb.abef);
            lb.cdgh = _mm_add_epi32(lb.cdgh, sb.cdgh);
        }
        from_lanes(la, a);
        from_lanes(lb, b);
    }
}

#[cfg(test)]
mod tests;

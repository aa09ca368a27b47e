//! AVX-VNNI for the fused resampler's tap loops: one `vpdpwssd` (`acc += a0·b0 + a1·b1` on
//! i16 pairs) in place of `vpmaddwd` + `vpaddd`. The only `unsafe` in smg-core.
//!
//! pulp 0.22 has no VNNI token, so this module has its own, as pulp builds its V3: a
//! [`V3Vnni`] exists only where runtime detection found pulp's V3 features and AVX-VNNI, and
//! [`V3Vnni::vectorize`] enters the kernels through a `#[target_feature]` function enabling
//! exactly those, so the `inline(always)` kernels of `avx2.rs` are compiled with VNNI inside it.
//!
//! The sums are bit for bit those of `vpmaddwd` + `vpaddd`: both wrap modulo 2^32 (neither
//! saturates), and with u8 pixels and i16 weights nothing comes near overflow anyway.
//! `fused::tests::vnni_and_avx2_give_the_same_patches` compares the two on odd sizes, and
//! `fused_equals_unfused` the VNNI path against the unfused AVX2 one.
//!
//! Speed (Xeon KVM guest, `stage_min pyfile` p50, builds alternated on one core, 4 rounds):
//! 4032×3024 stage 7.57-7.96 → 6.96-7.56 ms (PNG's pixels), 7.60-8.14 → 7.00-7.33 ms (JPEG's);
//! 640×480 0.657-0.691 → 0.605-0.629 ms; 1280×960 (`pystage`) 1.47-1.57 → 1.47-1.51 ms.
//!
//! Needs Rust 1.89 (the `avxvnni` target feature, its detection and intrinsics).

#![allow(unsafe_code)]
#![allow(clippy::inline_always)]

use core::arch::x86_64::{__m256i, _mm256_dpwssd_avx_epi32};

use pulp::x86::V3;

use super::avx2::Taps;

/// Proof that this CPU has pulp's V3 features (AVX2, FMA, ...) and AVX-VNNI: only
/// [`Self::try_new`] makes one.
#[derive(Clone, Copy, Debug)]
pub struct V3Vnni {
    v3: V3,
}

/// What [`V3Vnni::vectorize`] runs (pulp's `WithSimd`, for a [`Taps`]).
pub trait WithTaps {
    type Output;
    fn with_taps<T: Taps>(self, taps: T) -> Self::Output;
}

impl V3Vnni {
    pub fn try_new() -> Option<Self> {
        let v3 = V3::try_new()?;
        std::arch::is_x86_feature_detected!("avxvnni").then_some(Self { v3 })
    }

    /// `op.with_taps(self)`, compiled with V3's features and AVX-VNNI.
    #[inline(always)]
    pub fn vectorize<Op: WithTaps>(self, op: Op) -> Op::Output {
        #[target_feature(
            enable = "sse,sse2,fxsr,sse3,ssse3,sse4.1,sse4.2,popcnt,avx,avx2,bmi1,bmi2,fma,lzcnt,avxvnni"
        )]
        unsafe fn enter<Op: WithTaps>(taps: V3Vnni, op: Op) -> Op::Output {
            op.with_taps(taps)
        }
        // SAFETY: `self` exists only where `try_new` detected V3's features and AVX-VNNI,
        // which are all that `enter` enables.
        unsafe { enter(self, op) }
    }
}

impl Taps for V3Vnni {
    #[inline(always)]
    fn v3(self) -> V3 {
        self.v3
    }

    #[inline(always)]
    fn madd_add(self, acc: __m256i, pairs: __m256i, w: __m256i) -> __m256i {
        // SAFETY: a `V3Vnni` exists only where AVX-VNNI was detected (see `try_new`).
        unsafe { _mm256_dpwssd_avx_epi32(acc, pairs, w) }
    }
}

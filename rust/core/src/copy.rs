//! Copies between private memory and ring memory that another process may be writing or
//! reading at the same time. Ring memory is accessed only through relaxed 64-bit atomics
//! (the "bytewise atomic memcpy" of C++ proposal P1478), so a copy that races with the
//! producer is not undefined behaviour: it yields some mixture of bytes, which the caller
//! detects afterwards (copy, then validate) and discards.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

/// From this many bytes on (x86-64), the bulk of a copy is one `rep movsb` in inline
/// assembly instead of a loop of 8-byte atomic moves: the loop issues one 8-byte store per
/// cycle, about 70 % of what memcpy sustains on large frames; `rep movsb` (ERMSB) moves whole
/// cache lines. Assembly is outside the Rust memory model, so a race with another process is
/// what the hardware does (some mixture of bytes), not undefined behaviour, exactly as with
/// the atomics. Below this size the loop is faster (`rep movsb` has a start-up cost).
#[cfg(target_arch = "x86_64")]
const BULK: usize = 4096;

/// Copies `n` bytes with `rep movsb`, then `mfence`: the string operation's loads and stores
/// may be performed out of order among themselves, and the fence makes them all complete
/// before any later memory access (the commit flag after a write; the validity check after
/// a read).
///
/// # Safety
/// `src` is valid for reads and `dst` for writes of `n` bytes; they do not overlap.
#[cfg(target_arch = "x86_64")]
#[inline]
unsafe fn bulk_copy(dst: *mut u8, src: *const u8, n: usize) {
    // SAFETY: the caller's promise; rep movsb moves exactly rcx bytes from [rsi] to [rdi]
    // (the direction flag is clear, as the ABI guarantees) and clobbers only rcx, rsi, rdi.
    unsafe {
        std::arch::asm!(
            "rep movsb",
            "mfence",
            inout("rcx") n => _,
            inout("rsi") src => _,
            inout("rdi") dst => _,
            options(nostack, preserves_flags)
        );
    }
}

/// Copies `len` bytes from `src` (private) into the ring at `dst`.
///
/// # Safety
/// `dst` is 8-aligned and valid for writes of `len` rounded up to a multiple of 8 (ring
/// records are 64-byte multiples, so the rounding stays inside the record); `src` is valid
/// for reads of `len` bytes.
#[inline]
pub unsafe fn to_ring(dst: *mut u8, src: *const u8, len: usize) {
    debug_assert!(dst as usize % 8 == 0);
    #[cfg(target_arch = "x86_64")]
    if len >= BULK {
        let bulk = len & !7;
        // SAFETY: `bulk` <= len bytes: in bounds on both sides; the tail goes through the
        // word path below, which keeps the rounding guarantee.
        unsafe {
            bulk_copy(dst, src, bulk);
            to_ring(dst.add(bulk), src.add(bulk), len - bulk);
        }
        return;
    }
    let words = len / 8;
    let d = dst.cast::<u64>();
    for i in 0..words {
        // SAFETY: i < words, so both the 8 source bytes and the destination word are in
        // bounds; the source may be unaligned, hence read_unaligned.
        unsafe {
            let w = std::ptr::read_unaligned(src.add(i * 8).cast::<u64>());
            AtomicU64::from_ptr(d.add(i)).store(w, Ordering::Relaxed);
        }
    }
    let rest = len % 8;
    if rest != 0 {
        let mut last = [0u8; 8];
        // SAFETY: the last `rest` source bytes are in bounds; the destination word is
        // covered by the caller's rounding guarantee.
        unsafe {
            std::ptr::copy_nonoverlapping(src.add(words * 8), last.as_mut_ptr(), rest);
            AtomicU64::from_ptr(d.add(words)).store(u64::from_ne_bytes(last), Ordering::Relaxed);
        }
    }
}

/// Copies `len` bytes from the ring at `src` into private memory at `dst`.
///
/// # Safety
/// `src` is 8-aligned and valid for reads of `len` rounded up to a multiple of 8; `dst`
/// is valid for writes of `len` bytes and does not overlap the ring.
#[inline]
pub unsafe fn from_ring(dst: *mut u8, src: *const u8, len: usize) {
    debug_assert!(src as usize % 8 == 0);
    #[cfg(target_arch = "x86_64")]
    if len >= BULK {
        let bulk = len & !7;
        // SAFETY: `bulk` <= len bytes: in bounds on both sides; the tail goes through the
        // word path below.
        unsafe {
            bulk_copy(dst, src, bulk);
            from_ring(dst.add(bulk), src.add(bulk), len - bulk);
        }
        return;
    }
    let words = len / 8;
    let s = src.cast::<u64>().cast_mut();
    for i in 0..words {
        // SAFETY: i < words: in bounds on both sides; destination may be unaligned.
        unsafe {
            let w = AtomicU64::from_ptr(s.add(i)).load(Ordering::Relaxed);
            std::ptr::write_unaligned(dst.add(i * 8).cast::<u64>(), w);
        }
    }
    let rest = len % 8;
    if rest != 0 {
        // SAFETY: the source word is covered by the caller's rounding guarantee; only the
        // `rest` bytes that belong to the destination are written.
        unsafe {
            let w = AtomicU64::from_ptr(s.add(words))
                .load(Ordering::Relaxed)
                .to_ne_bytes();
            std::ptr::copy_nonoverlapping(w.as_ptr(), dst.add(words * 8), rest);
        }
    }
}

/// Copies `len` bytes from `src` (private) into the ring at `dst`, which need not be
/// aligned: single bytes up to the first 8-byte boundary, words, then single bytes. Unlike
/// `to_ring` it writes exactly `len` bytes, so successive calls can fill a record piecewise.
///
/// # Safety
/// `dst` is valid for writes of `len` bytes, `src` for reads of `len` bytes.
pub unsafe fn to_ring_exact(dst: *mut u8, src: *const u8, len: usize) {
    let head = (dst.align_offset(8)).min(len);
    for i in 0..head {
        // SAFETY: i < head <= len: in bounds on both sides.
        unsafe { AtomicU8::from_ptr(dst.add(i)).store(*src.add(i), Ordering::Relaxed) };
    }
    let words = (len - head) / 8;
    // SAFETY: dst + head is 8-aligned; `words` whole words fit in the remaining length.
    unsafe { to_ring(dst.add(head), src.add(head), words * 8) };
    for i in head + words * 8..len {
        // SAFETY: i < len: in bounds on both sides.
        unsafe { AtomicU8::from_ptr(dst.add(i)).store(*src.add(i), Ordering::Relaxed) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_length_and_misalignment() {
        // Short lengths (the word loop) and lengths around and above BULK (rep movsb + tail).
        let lens = (0..200usize).chain(4088..4112).chain([65536 + 3, 1 << 20]);
        let mut ring = vec![0u64; (1 << 17) + 8];
        for len in lens {
            for mis in 0..8usize {
                let src: Vec<u8> = (0..len + mis).map(|i| (i * 31 + len) as u8).collect();
                ring.iter_mut().for_each(|w| *w = u64::MAX);
                // SAFETY: `ring` is a Vec<u64> (8-aligned) of (1 << 17) + 8 words, more than
                // any `len` here rounded up to 8; `src` holds `len + mis` bytes.
                unsafe { to_ring(ring.as_mut_ptr().cast(), src.as_ptr().add(mis), len) };
                let mut out = vec![0xAAu8; len + mis + 3];
                // SAFETY: `ring` as above, readable for `len` rounded up to 8; `out` holds
                // `len + mis + 3` bytes and is a separate allocation.
                unsafe { from_ring(out.as_mut_ptr().add(mis), ring.as_ptr().cast(), len) };
                assert_eq!(
                    &out[mis..mis + len],
                    &src[mis..],
                    "length {len}, misaligned by {mis}"
                );
                assert_eq!(out[mis + len], 0xAA, "wrote past the end");
                // The rounding bytes of the last word are zeroed, not left stale; nothing after.
                // SAFETY: the whole of `ring`, as bytes; it is not written while `bytes` lives.
                let bytes: &[u8] =
                    unsafe { std::slice::from_raw_parts(ring.as_ptr().cast(), ring.len() * 8) };
                assert!(bytes[len..len.div_ceil(8) * 8].iter().all(|&b| b == 0));
                assert!(bytes[len.div_ceil(8) * 8..len.div_ceil(8) * 8 + 8]
                    .iter()
                    .all(|&b| b == 0xFF));
            }
        }
    }

    #[test]
    fn exact_copies_fill_piecewise_without_touching_neighbours() {
        let mut ring = vec![0u64; 32];
        let base: *mut u8 = ring.as_mut_ptr().cast();
        let src: Vec<u8> = (0..200u8).collect();
        // Pieces of 4, 4, 3, 17, 100 bytes at unaligned offsets, like an IPC writer's.
        let mut at = 0;
        for n in [4usize, 4, 3, 17, 100] {
            // SAFETY: at + n <= 128 bytes, inside both `ring` (256 bytes) and `src` (200).
            unsafe { to_ring_exact(base.add(at), src.as_ptr().add(at), n) };
            at += n;
        }
        // SAFETY: `base` points to `ring`'s 256 bytes, not written while `bytes` lives.
        let bytes: &[u8] = unsafe { std::slice::from_raw_parts(base, 256) };
        assert_eq!(&bytes[..at], &src[..at]);
        assert!(
            bytes[at..].iter().all(|&b| b == 0),
            "nothing written past the pieces"
        );
    }
}

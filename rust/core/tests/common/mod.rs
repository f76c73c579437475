//! Shared by the integration tests: a ring path in /dev/shm (or the temp dir), removed
//! when dropped; self-checking payloads and a deterministic size generator.

// Each test file is its own crate and uses only part of this module.
#![allow(dead_code)]

use std::path::PathBuf;

use rust_daq_core::Reader;

pub struct TempRing(pub PathBuf);

impl TempRing {
    pub fn new(tag: &str) -> TempRing {
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        TempRing(dir.join(format!("rdaq-test-{tag}-{}-{n}", std::process::id())))
    }
}

impl Drop for TempRing {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// xorshift64*: deterministic sizes without a dependency.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A payload that carries its own index and a checksum of everything else.
pub fn payload(index: u64, len: usize) -> Vec<u8> {
    let len = len.max(16);
    let mut v = vec![0u8; len];
    v[..8].copy_from_slice(&index.to_le_bytes());
    for (i, b) in v[16..].iter_mut().enumerate() {
        *b = (index as usize * 31 + i * 7) as u8;
    }
    let sum = fnv(&v[16..]);
    v[8..16].copy_from_slice(&sum.to_le_bytes());
    v
}

pub fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ x as u64).wrapping_mul(0x100_0000_01b3)
    })
}

pub fn check(p: &[u8]) -> u64 {
    let idx = u64::from_le_bytes(p[..8].try_into().unwrap());
    let sum = u64::from_le_bytes(p[8..16].try_into().unwrap());
    assert_eq!(sum, fnv(&p[16..]), "payload of record {idx} is corrupt");
    idx
}

pub fn drain(rd: &mut Reader) -> Vec<(u64, Vec<u8>)> {
    let mut out = vec![];
    while let Some((rec, buf)) = rd.next_copy().unwrap() {
        out.push((rec.seq, buf));
    }
    out
}

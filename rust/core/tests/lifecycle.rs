//! A ring's life: creating, reopening and replacing it, one producer at a time, and a
//! restarted producer recovering from one killed mid-record.
//!
//! Through the public API, on real files in /dev/shm (or the temp dir where there is none).

use std::sync::atomic::Ordering;
use std::time::Duration;

use rust_daq_core::format::off;
use rust_daq_core::{ClaimResult, Error, Next, Policy, Reader, Ring, Start};

mod common;
use common::{check, drain, payload, TempRing};

#[test]
fn producer_killed_mid_record_leaves_nothing_readable_and_restart_continues() {
    let t = TempRing::new("crash");
    let (ring, mut p) = Ring::create(&t.0, 8192, Policy::Overwrite, false).unwrap();
    for i in 0..3u64 {
        p.write(&payload(i, 40), 0, None, Duration::ZERO).unwrap();
    }
    let c = match p.try_claim(64, 0, None).unwrap() {
        ClaimResult::Claimed(c) => c,
        ClaimResult::WouldBlock { .. } => unreachable!(),
    };
    // SAFETY: 32 bytes read from a 32-byte array, into a 64-byte claim.
    unsafe { p.fill(&c, [0xEEu8; 32].as_ptr(), 32) };
    // Simulate SIGKILL: the process vanishes without running Drop; its pid is gone.
    std::mem::forget(p);
    // The lock word of docs/ring-format.md: pid | (start time mod 2^32) << 32.
    ring.region()
        .h64(off::PRODUCER_LOCK)
        .store(0x7fff_fff0 | (1 << 32), Ordering::Release);
    let mut rd = Reader::new(ring.clone(), Start::Oldest).unwrap();
    assert_eq!(drain(&mut rd).len(), 3);
    assert_eq!(rd.peek().unwrap(), Next::Busy { seq: 3 });
    let (ring2, mut p2) = Ring::create(&t.0, 8192, Policy::Overwrite, false).unwrap();
    assert_eq!(p2.took_over_from(), Some(0x7fff_fff0));
    assert_eq!(
        p2.next_seq(),
        3,
        "sequence continues; the torn record's number is reused"
    );
    assert_eq!(
        rd.peek().unwrap(),
        Next::Empty,
        "the torn record became padding"
    );
    assert_eq!(
        p2.write(&payload(3, 40), 0, None, Duration::ZERO).unwrap(),
        3
    );
    let got = drain(&mut rd);
    assert_eq!(got.len(), 1);
    assert_eq!(check(&got[0].1), 3);
    assert_eq!(rd.lost(), 0);
    drop(ring2);
}

#[test]
fn one_producer_per_ring() {
    let t = TempRing::new("lock");
    let (_ring, p) = Ring::create(&t.0, 8192, Policy::Overwrite, false).unwrap();
    match Ring::open(&t.0, true) {
        Err(Error::ProducerActive {
            pid,
            this_process: true,
        }) => assert_eq!(pid, std::process::id()),
        other => panic!("expected ProducerActive, got {:?}", other.map(|_| ())),
    }
    drop(p);
    let (_r2, p2) = Ring::open(&t.0, true).unwrap();
    assert!(p2.is_some());
}

#[test]
fn reopen_keeps_data_other_capacity_needs_replace() {
    let t = TempRing::new("reopen");
    {
        let (_r, mut p) = Ring::create(&t.0, 8192, Policy::Overwrite, false).unwrap();
        for i in 0..5u64 {
            p.write(&payload(i, 30), 0, None, Duration::ZERO).unwrap();
        }
    }
    let (ring, mut p) = Ring::create(&t.0, 8192, Policy::Overwrite, false).unwrap();
    assert_eq!(
        p.write(&payload(5, 30), 0, None, Duration::ZERO).unwrap(),
        5
    );
    let mut rd = Reader::new(ring.clone(), Start::Oldest).unwrap();
    assert_eq!(
        drain(&mut rd).iter().map(|g| g.0).collect::<Vec<_>>(),
        vec![0, 1, 2, 3, 4, 5]
    );
    drop(p);
    let err = Ring::create(&t.0, 16384, Policy::Overwrite, false)
        .map(|_| ())
        .unwrap_err();
    assert!(err.to_string().contains("capacity 8192"), "{err}");
    let err = Ring::create(&t.0, 8192, Policy::Block, false)
        .map(|_| ())
        .unwrap_err();
    assert!(err.to_string().contains("policy \"overwrite\""), "{err}");
    let (ring3, _p3) = Ring::create(&t.0, 16384, Policy::Overwrite, true).unwrap();
    assert_eq!(ring3.capacity(), 16384);
    assert_eq!(ring3.status().next_seq, 0);
    assert_ne!(ring3.session_id(), ring.session_id());
}

#[test]
fn bad_capacities_are_refused() {
    let t = TempRing::new("cap");
    for (cap, needle) in [
        (0u64, "greater than 0"),
        (100, "too small"),
        (1 << 50, "beyond what can be mapped"),
    ] {
        let e = Ring::create(&t.0, cap, Policy::Overwrite, false)
            .map(|_| ())
            .unwrap_err();
        assert!(e.to_string().contains(needle), "{cap}: {e}");
    }
    assert!(!t.0.exists());
    // Unaligned capacities are rounded up to the record alignment.
    let (ring, _p) = Ring::create(&t.0, 5000, Policy::Overwrite, false).unwrap();
    assert_eq!(ring.capacity(), 5056);
}

//! The ring against a hostile file: truncated while mapped, header positions overwritten,
//! planted by another user, stream ids shared between plain and Arrow records, odd names.
//! Real files in /dev/shm (or the temp dir).

use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Duration;

use rust_daq_core::format::off;
use rust_daq_core::{Error, Policy, Reader, Ring, Start};

mod common;
use common::TempRing;

fn truncate(path: &std::path::Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

/// Runs `f` on another thread and fails (instead of hanging the suite) if it does not
/// finish: a loop over corrupt positions must end.
fn finishes<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(120))
        .expect("the call never returned: an unbounded loop over ring contents")
}

fn corrupt_truncated(e: Error) {
    match e {
        Error::Corrupt { detail } => assert!(detail.contains("truncated while mapped"), "{detail}"),
        other => panic!("expected a corrupt-ring error, got {other:?}"),
    }
}

#[test]
fn truncation_while_mapped_is_an_error_not_a_sigbus() {
    let t = TempRing::new("shrink");
    let (ring, mut p) = Ring::create(&t.0, 1 << 16, Policy::Overwrite, false).unwrap();
    let mut rd = Reader::new(ring.clone(), Start::Oldest).unwrap();
    for i in 0..50u8 {
        p.write(&[i; 300], 0, None, Duration::ZERO).unwrap();
    }
    let (_, first) = rd.next_copy().unwrap().unwrap();
    assert_eq!(first, vec![0u8; 300]);
    // A second, read-only mapping (another handle) and a raw pointer into the data region,
    // as a zero-copy view holds.
    let (ro, _) = Ring::open(&t.0, false).unwrap();
    let view = ro.region().data_ptr() as *const u8;
    truncate(&t.0, 12288);
    // Reading a zero-copy view's bytes completes (zeros) instead of killing the process.
    // SAFETY: `view` points into `ro`'s data mapping, which is still mapped (`ro` lives), and
    // byte 64 is inside it; the pages the file lost are backed by zero pages (see `Guard`).
    let b = unsafe { std::ptr::read_volatile(view.add(64)) };
    assert_eq!(b, 0);
    assert!(
        !ro.still_valid(0),
        "a view over a truncated ring is never valid"
    );
    corrupt_truncated(ro.check_tripped().unwrap_err());
    // The reader, the producer, snapshots: each an error, none a crash.
    corrupt_truncated(rd.next_copy().unwrap_err());
    corrupt_truncated(p.write(b"more", 0, None, Duration::ZERO).unwrap_err());
    corrupt_truncated(ring.read_snapshot().unwrap_err());
    corrupt_truncated(Reader::new(ring.clone(), Start::Oldest).err().unwrap());
    drop(p);
    // What was delivered before is intact.
    assert_eq!(first, vec![0u8; 300]);
}

#[test]
fn truncating_the_header_away_is_an_error_too() {
    let t = TempRing::new("shrink0");
    let (ring, mut p) = Ring::create(&t.0, 8192, Policy::Overwrite, false).unwrap();
    p.write(b"x", 0, None, Duration::ZERO).unwrap();
    truncate(&t.0, 0);
    let e = p.write(b"y", 0, None, Duration::ZERO).unwrap_err();
    corrupt_truncated(e);
    assert!(!ring.still_valid(0));
}

#[test]
fn corrupt_write_positions_end_in_an_error_not_a_spin() {
    for bad in [0u64, 64, 12345, 1 << 40] {
        let t = TempRing::new("badpos");
        let (ring, mut p) = Ring::create(&t.0, 8192, Policy::Overwrite, false).unwrap();
        // Lap the ring a few times so that oldest_pos is far from 0.
        for i in 0..300u64 {
            p.write(&i.to_le_bytes().repeat(20), 0, None, Duration::ZERO)
                .unwrap();
        }
        ring.region()
            .h64(off::WRITE_POS)
            .store(bad, Ordering::Release);
        let r = ring.clone();
        let got = finishes(move || Reader::new(r, Start::Oldest).map(|_| ()));
        match got {
            Err(Error::Corrupt { detail }) => {
                assert!(detail.contains("position"), "{bad}: {detail}")
            }
            other => panic!("write_pos {bad}: expected a corrupt-ring error, got {other:?}"),
        }
        // The other loops over ring contents end too (with data or an error).
        let r = ring.clone();
        let _ = finishes(move || r.read_snapshot().map(|_| ()));
        let r = ring.clone();
        let _ = finishes(move || r.advance_tail(64).map(|_| ()));
    }
}

#[test]
fn corrupt_oldest_and_commit_positions_end_in_an_error() {
    let t = TempRing::new("badpos2");
    let (ring, mut p) = Ring::create(&t.0, 8192, Policy::Overwrite, false).unwrap();
    for i in 0..10u64 {
        p.write(&i.to_le_bytes(), 0, None, Duration::ZERO).unwrap();
    }
    let h = |f| ring.region().h64(f);
    let write = h(off::WRITE_POS).load(Ordering::Relaxed);
    // commit_pos beyond write_pos: a reader at the end would wait for data forever.
    h(off::COMMIT_POS).store(write + 640, Ordering::Release);
    let r = ring.clone();
    let mut rd = finishes(move || Reader::new(r, Start::Latest)).unwrap();
    assert!(matches!(rd.peek(), Err(Error::Corrupt { .. })));
    h(off::COMMIT_POS).store(write, Ordering::Release);
    h(off::OLDEST_POS).store(12345, Ordering::Release);
    let r = ring.clone();
    assert!(matches!(
        finishes(move || Reader::new(r, Start::Oldest).map(|_| ())),
        Err(Error::Corrupt { .. })
    ));
}

#[cfg(target_os = "linux")]
fn euid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").unwrap().uid()
}

#[test]
fn a_ring_file_open_to_others_is_refused_for_producing() {
    let t = TempRing::new("mode");
    drop(Ring::create(&t.0, 8192, Policy::Overwrite, false).unwrap());
    let mode = std::fs::metadata(&t.0).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "ring files are created 0600");
    std::fs::set_permissions(&t.0, std::fs::Permissions::from_mode(0o666)).unwrap();
    for e in [
        Ring::create(&t.0, 8192, Policy::Overwrite, false)
            .err()
            .unwrap(),
        Ring::open(&t.0, true).err().unwrap(),
    ] {
        match e {
            Error::Untrusted { detail, .. } => {
                assert!(detail.contains("mode 0666"), "{detail}")
            }
            other => panic!("expected Untrusted, got {other:?}"),
        }
    }
    // Reading stays allowed.
    assert!(Ring::open(&t.0, false).is_ok());
}

#[cfg(target_os = "linux")]
#[test]
fn a_ring_file_planted_by_another_user_is_refused() {
    if euid() != 0 {
        eprintln!("skipped: needs root to chown a file to another user");
        return;
    }
    let t = TempRing::new("owner");
    drop(Ring::create(&t.0, 8192, Policy::Overwrite, false).unwrap());
    std::os::unix::fs::chown(&t.0, Some(65534), Some(65534)).unwrap();
    match Ring::create(&t.0, 8192, Policy::Overwrite, false)
        .err()
        .unwrap()
    {
        Error::Untrusted { detail, .. } => {
            assert!(detail.contains("owned by uid 65534"), "{detail}")
        }
        other => panic!("expected Untrusted, got {other:?}"),
    }
}

#[test]
fn a_symlink_at_the_ring_path_is_refused() {
    let t = TempRing::new("link");
    let target = TempRing::new("linktarget");
    drop(Ring::create(&target.0, 8192, Policy::Overwrite, false).unwrap());
    std::os::unix::fs::symlink(&target.0, &t.0).unwrap();
    match Ring::create(&t.0, 8192, Policy::Overwrite, false)
        .err()
        .unwrap()
    {
        Error::Untrusted { detail, .. } => assert!(detail.contains("symlink"), "{detail}"),
        other => panic!("expected Untrusted, got {other:?}"),
    }
}

#[test]
fn plain_records_cannot_use_an_arrow_streams_id() {
    let t = TempRing::new("ids");
    let (ring, mut p) = Ring::create(&t.0, 1 << 16, Policy::Overwrite, false).unwrap();
    // Plain records on stream 1 first: the Arrow stream registered next skips id 1.
    p.write(b"plain", 1, None, Duration::ZERO).unwrap();
    let volts = p.register_schema("volts", b"schema").unwrap();
    assert_eq!(volts.stream_id, 2);
    match p.write(b"plain", 2, None, Duration::ZERO).unwrap_err() {
        Error::StreamIdTaken { stream, name } => assert_eq!((stream, name.as_str()), (2, "volts")),
        other => panic!("expected StreamIdTaken, got {other:?}"),
    }
    assert!(
        p.try_claim_tagged(8, 3, volts.schema_id, None).is_err(),
        "wrong id for the schema"
    );
    assert!(
        p.try_claim_tagged(8, 2, 99, None).is_err(),
        "unknown schema"
    );
    for _ in 0..3 {
        match p.try_claim_tagged(8, 2, volts.schema_id, None).unwrap() {
            rust_daq_core::ClaimResult::Claimed(c) => {
                p.commit(c).unwrap();
            }
            _ => unreachable!(),
        }
        p.write(b"plain", 1, None, Duration::ZERO).unwrap();
    }
    let mut rd = Reader::new(ring.clone(), Start::Oldest).unwrap();
    let seqs: Vec<_> = std::iter::from_fn(|| rd.next_copy().unwrap())
        .filter(|(r, _)| r.stream == 2)
        .map(|(r, _)| r.stream_seq)
        .collect();
    assert_eq!(seqs, vec![0, 1, 2]);
    // A restarted producer knows the Arrow ids from the schema table.
    drop(p);
    let (_r, mut p2) = Ring::create(&t.0, 1 << 16, Policy::Overwrite, false).unwrap();
    assert!(p2.write(b"plain", 2, None, Duration::ZERO).is_err());
    assert!(p2.write(b"plain", 1, None, Duration::ZERO).is_ok());
}

#[test]
fn long_ring_names_work_up_to_the_file_name_limit() {
    let dir = TempRing::new("x").0.parent().unwrap().to_path_buf();
    let long = dir.join("r".repeat(250));
    let _cleanup = TempRing(long.clone());
    drop(Ring::create(&long, 8192, Policy::Overwrite, false).unwrap());
    assert!(long.exists());
    let too_long = dir.join("r".repeat(300));
    match Ring::create(&too_long, 8192, Policy::Overwrite, false)
        .err()
        .unwrap()
    {
        Error::Config { detail } => assert!(detail.contains("300 bytes"), "{detail}"),
        other => panic!("expected Config, got {other:?}"),
    }
}

#[test]
fn a_run_of_rows_into_a_truncated_ring_is_an_error_and_publishes_nothing_it_lost() {
    let t = TempRing::new("shrink-rows");
    let (ring, mut p) = Ring::create(&t.0, 1 << 16, Policy::Overwrite, false).unwrap();
    let rows: Vec<u8> = (0..100u8).flat_map(|i| [i; 64]).collect();
    // SAFETY (both calls): `rows` holds 100 rows of 64 bytes.
    assert_eq!(
        unsafe { p.write_rows(rows.as_ptr(), 100, 64, 0) }.unwrap(),
        100
    );
    let before = ring.status();
    truncate(&t.0, 12288);
    corrupt_truncated(unsafe { p.write_rows(rows.as_ptr(), 100, 64, 0) }.unwrap_err());
    // The data region is gone (12 KiB is inside the header and schema region): the run's
    // first record went into a zero page, and nothing of the run was counted as written.
    assert_eq!(ring.snapshot(), (before.commit_pos, before.next_seq));
}

//! Shared by the integration tests: a ring path in /dev/shm (or the temp dir), removed
//! when dropped.

use std::path::PathBuf;

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

//! Disk space of the data directory: how much is free, and the budget the embedded store keeps
//! from it (a size cap for telemetry, a reserve no write may eat into).
//!
//! Telemetry is the only state that grows with traffic (≈1.5 GB a minute at 73,000 messages a
//! second were measured), so it gets a cap, and every writer refuses (retryably) before the
//! filesystem is full instead of failing after it: a full disk also stops SQLite from
//! checkpointing its WAL, and then the registry cannot take a single registration.

use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;

/// What a filesystem has: bytes free for an unprivileged writer, and its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Space {
    pub free: u64,
    pub total: u64,
}

/// Free space and size of the filesystem holding `path` (`statvfs`).
pub fn space(path: &Path) -> io::Result<Space> {
    let s = rustix::fs::statvfs(path)?;
    Ok(Space { free: s.f_bavail.saturating_mul(s.f_frsize), total: s.f_blocks.saturating_mul(s.f_frsize) })
}

/// The default free-space reserve: 2% of the filesystem, at least 128 MiB and at most 2 GiB.
/// Below it telemetry is refused; the registry keeps half of it (see
/// [`crate::SqliteStore::open_with`]) for its WAL, checkpoints and the registrations still
/// arriving. 2% leaves a small disk room to work in; 2 GiB is more than a registry checkpoint
/// needs on any large one.
pub fn default_reserve(space: Space) -> u64 {
    (space.total / 50).clamp(128 * MIB, 2 * GIB)
}

/// The default size cap of the telemetry log: half of what it could grow to at start (the free
/// space above the reserve, plus what the log holds already), at least 256 MiB (four 64 MiB
/// segments, so the cap never drops the segment just sealed) and at most 1 TiB (past that the
/// time retention is what bounds it). Derived again at every start, so freeing disk space raises
/// it; the reserve still guards what the cap cannot foresee (other files growing).
pub fn default_event_cap(space: Space, reserve: u64, log_bytes: u64) -> u64 {
    (space.free.saturating_sub(reserve).saturating_add(log_bytes) / 2).clamp(256 * MIB, 1024 * GIB)
}

/// Bytes of the files directly in `dir` (the telemetry log's segments).
pub fn dir_bytes(dir: &Path) -> io::Result<u64> {
    let mut total = 0;
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            for e in entries {
                let meta = e?.metadata()?;
                if meta.is_file() {
                    total += meta.len();
                }
            }
            Ok(total)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

/// Creates `dir` (and its parents) owner-only, and makes an existing one owner-only.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Options to open (or create) a file readable and writable by its owner only.
pub fn private_file() -> std::fs::OpenOptions {
    let mut o = std::fs::OpenOptions::new();
    o.mode(0o600);
    o
}

/// Creates `path` empty and owner-only when it does not exist (for SQLite, which creates its
/// database with the process umask and its `-wal`/`-shm` with the database's mode).
pub fn ensure_private_file(path: &Path) -> io::Result<()> {
    private_file().write(true).create(true).truncate(false).open(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_disk_within_bounds() {
        let small = Space { free: 3 * GIB, total: 4 * GIB };
        assert_eq!(default_reserve(small), 128 * MIB);
        assert_eq!(default_event_cap(small, 128 * MIB, 0), (3 * GIB - 128 * MIB) / 2);
        let big = Space { free: 54 * GIB, total: 252 * GIB };
        assert_eq!(default_reserve(big), 2 * GIB);
        assert_eq!(default_event_cap(big, 2 * GIB, 10 * GIB), 31 * GIB);
        let full = Space { free: 10 * MIB, total: 100 * GIB };
        assert_eq!(default_event_cap(full, 2 * GIB, 0), 256 * MIB, "the floor");
        let huge = Space { free: 100_000 * GIB, total: 200_000 * GIB };
        assert_eq!(default_event_cap(huge, 2 * GIB, 0), 1024 * GIB, "the ceiling");
    }

    #[test]
    fn space_of_a_real_directory() {
        let s = space(&std::env::temp_dir()).unwrap();
        assert!(s.total > 0 && s.free <= s.total, "{s:?}");
    }
}

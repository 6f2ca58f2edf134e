//! The data directory's lock: one server at a time, and command-line changes not halfway
//! through a server's start.

use std::path::Path;

use crate::datadir::DataDirError;

/// The advisory lock on `fleetgate.lock` in a data directory; released when dropped (or when
/// the process ends, however it ends).
#[derive(Debug)]
pub struct DirLock {
    _file: std::fs::File,
}

impl DirLock {
    /// Takes the lock of the data directory `dir` (which must exist) for `what` (written into
    /// the file next to the pid, for the message a second taker gets), or says who holds it.
    pub fn acquire(dir: &Path, what: &str) -> Result<Self, DataDirError> {
        use std::io::{Read, Seek, Write};
        let path = dir.join("fleetgate.lock");
        let mut file = fleetgate_store::disk::private_file()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|source| DataDirError::Io { path: path.clone(), source })?;
        if file.try_lock().is_err() {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let holder = if holder.is_empty() { "another process".to_owned() } else { holder.to_owned() };
            return Err(DataDirError::InUse { dir: dir.to_owned(), holder });
        }
        file.set_len(0).map_err(|source| DataDirError::Io { path: path.clone(), source })?;
        file.rewind().map_err(|source| DataDirError::Io { path: path.clone(), source })?;
        writeln!(file, "pid {} ({what})", std::process::id())
            .map_err(|source| DataDirError::Io { path: path.clone(), source })?;
        Ok(Self { _file: file })
    }
}

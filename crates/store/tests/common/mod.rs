//! Helpers shared by the store's test binaries.
#![allow(dead_code)]

use std::ops::Deref;
use std::path::{Path, PathBuf};

/// A path in a fresh temporary directory, removed (with everything in it) when dropped: usable
/// wherever a path is.
pub struct TempPath {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl TempPath {
    /// The directory itself.
    pub fn dir() -> Self {
        let dir = tempfile::Builder::new().prefix("fg-store-").tempdir().unwrap();
        Self { path: dir.path().to_owned(), _dir: dir }
    }

    /// `name` inside a fresh directory (not created).
    pub fn file(name: &str) -> Self {
        let dir = tempfile::Builder::new().prefix("fg-store-").tempdir().unwrap();
        Self { path: dir.path().join(name), _dir: dir }
    }
}

impl Deref for TempPath {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for TempPath {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

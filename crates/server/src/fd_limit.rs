//! The connection cap derived from the process's file-descriptor limit.
//!
//! Every connection is a file descriptor, and so is every store file, event-log segment and
//! listener. A cap above the limit lets connections take the last descriptors: then the store
//! cannot open a file and `accept` fails for every device, good or bad. So the cap is the lower
//! of the configured one and what the limit leaves after a reserve for everything else.

/// Descriptors kept back for the store, log segments, listeners and the like, on top of a tenth
/// of the limit.
const FIXED_RESERVE: u64 = 256;
/// The least the cap is lowered to, however small the limit: a server that accepts nothing helps
/// no one, and a limit this small is a misconfiguration the start-up log points out.
const MIN_CONNECTIONS: usize = 32;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit where allowed, and returns the soft limit
/// in effect (`None`: unlimited or unknown).
pub fn raise_nofile_limit() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    if let (Some(soft), Some(hard)) = (limit.current, limit.maximum) {
        if soft < hard {
            match setrlimit(Resource::Nofile, Rlimit { current: Some(hard), maximum: Some(hard) }) {
                Ok(()) => return Some(hard),
                Err(e) => tracing::warn!(soft, hard, error = %e, "could not raise the file-descriptor limit"),
            }
        }
    }
    limit.current
}

/// The connection cap: `configured`, lowered to the descriptor limit `nofile` less a reserve of
/// a tenth of it plus [`FIXED_RESERVE`] (never below [`MIN_CONNECTIONS`]).
pub fn connection_cap(configured: usize, nofile: Option<u64>) -> usize {
    let Some(nofile) = nofile else { return configured };
    let usable = nofile.saturating_sub(nofile / 10 + FIXED_RESERVE);
    let usable = usize::try_from(usable).unwrap_or(usize::MAX).max(MIN_CONNECTIONS);
    configured.min(usable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_room_for_the_store() {
        // The report's process: 20,000 descriptors, 50,000 configured.
        assert_eq!(connection_cap(50_000, Some(20_000)), 20_000 - 2_000 - 256);
        // A configured cap below what the limit allows stands.
        assert_eq!(connection_cap(1_000, Some(1_048_576)), 1_000);
        // The usual default soft limit.
        assert_eq!(connection_cap(50_000, Some(1024)), 1024 - 102 - 256);
        // Unlimited (or unknown): the configured cap.
        assert_eq!(connection_cap(50_000, None), 50_000);
    }

    #[test]
    fn a_tiny_limit_still_admits_a_few() {
        assert_eq!(connection_cap(50_000, Some(100)), MIN_CONNECTIONS);
        assert_eq!(connection_cap(10, Some(100)), 10);
        assert_eq!(connection_cap(50_000, Some(0)), MIN_CONNECTIONS);
    }

    #[test]
    fn raising_keeps_a_limit_in_effect() {
        let after = raise_nofile_limit();
        let now = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
        assert_eq!(after, now);
    }
}

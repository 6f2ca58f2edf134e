//! An in-memory copy of something every device request reads (enrollment groups, linked hubs,
//! access policies). Every change to it goes through this process's service API, which updates
//! or drops the copy, so a device sees a change at once.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// A copy loaded on first use. A load that raced with a change is used once but not kept: a
/// change bumps the generation, and a load keeps its result only if none happened meanwhile.
pub struct Cached<T> {
    value: RwLock<Option<Arc<T>>>,
    generation: AtomicU64,
}

impl<T: Clone> Default for Cached<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Clone> Cached<T> {
    pub fn new() -> Self {
        Self { value: RwLock::new(None), generation: AtomicU64::new(0) }
    }

    pub async fn get<E, F, Fut>(&self, load: F) -> Result<Arc<T>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        if let Some(v) = self.value.read().unwrap_or_else(|p| p.into_inner()).clone() {
            return Ok(v);
        }
        let generation = self.generation.load(Ordering::SeqCst);
        let fresh = Arc::new(load().await?);
        let mut slot = self.value.write().unwrap_or_else(|p| p.into_inner());
        if self.generation.load(Ordering::SeqCst) == generation {
            *slot = Some(fresh.clone());
        }
        Ok(fresh)
    }

    /// Forgets the copy; the next [`Cached::get`] loads it again.
    pub fn invalidate(&self) {
        let mut slot = self.value.write().unwrap_or_else(|p| p.into_inner());
        self.generation.fetch_add(1, Ordering::SeqCst);
        *slot = None;
    }

    /// Applies a change to the copy, if one is loaded (cheaper than reloading a large one).
    pub fn update(&self, change: impl FnOnce(&mut T)) {
        let mut slot = self.value.write().unwrap_or_else(|p| p.into_inner());
        self.generation.fetch_add(1, Ordering::SeqCst);
        if let Some(v) = slot.as_mut() {
            change(Arc::make_mut(v));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn loads_once_and_reloads_after_invalidation() {
        let c: Cached<Vec<u32>> = Cached::new();
        let loads = std::sync::atomic::AtomicUsize::new(0);
        let load = || async {
            loads.fetch_add(1, Ordering::SeqCst);
            Ok::<_, ()>(vec![1])
        };
        assert_eq!(*c.get(load).await.unwrap(), vec![1]);
        assert_eq!(*c.get(load).await.unwrap(), vec![1]);
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        c.update(|v| v.push(2));
        assert_eq!(*c.get(load).await.unwrap(), vec![1, 2]);
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        c.invalidate();
        assert_eq!(*c.get(load).await.unwrap(), vec![1]);
        assert_eq!(loads.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_load_that_raced_with_a_change_is_not_kept() {
        let c: Cached<Vec<u32>> = Cached::new();
        // The change lands while the (stale) load is in flight.
        let stale = c
            .get(|| async {
                c.update(|v| v.push(9));
                Ok::<_, ()>(vec![1])
            })
            .await
            .unwrap();
        assert_eq!(*stale, vec![1]);
        let fresh = c.get(|| async { Ok::<_, ()>(vec![1, 9]) }).await.unwrap();
        assert_eq!(*fresh, vec![1, 9]);
    }
}
